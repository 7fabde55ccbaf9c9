"""Exact match of a GGUF in llama.cpp on a chat split: each prompt through the GGUF's own chat template
(`llama_cpp.Llama.create_chat_completion`, as LM Studio does), greedy, against the final assistant message.

    python scripts/llamacpp_exact_match.py tuned.q8_0.gguf data/toolcall/test.jsonl [--limit N]

The scoring is `mlxtune eval`'s: the stripped reply must equal the stripped answer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tqdm.auto import tqdm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf")
    p.add_argument("data", help="a chat .jsonl file (messages ending with the assistant's answer)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=1,
                   help="llama.cpp threads (its threads spin: more threads than free cores is far slower)")
    a = p.parse_args()
    import llama_cpp  # heavy and optional: only this script needs it

    rows = [json.loads(line) for line in open(a.data, encoding="utf-8") if line.strip()][: a.limit]
    saved = os.dup(2)  # llama.cpp logs to fd 2 while loading
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    try:
        llm = llama_cpp.Llama(a.gguf, n_ctx=512, n_threads=a.threads, verbose=False)
    finally:
        os.dup2(saved, 2)
    correct = 0
    for row in tqdm(rows, desc="llama.cpp"):
        messages, answer = row["messages"][:-1], row["messages"][-1]["content"]
        out = llm.create_chat_completion(messages=messages, temperature=0.0, repeat_penalty=1.0, max_tokens=a.max_tokens)
        correct += out["choices"][0]["message"]["content"].strip() == answer.strip()
    print(f"{a.gguf}: exact match {correct}/{len(rows)} = {100 * correct / max(len(rows), 1):.1f}%")
    sys.exit(0)


if __name__ == "__main__":
    main()
