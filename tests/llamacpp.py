"""llama.cpp itself (through the llama-cpp-python bindings) as the judge of the GGUF files we write.

Named `llamacpp` (not `llama_cpp`) so that it never shadows the real package on the tests path.

Shared by the GGUF tests. The one thing to know: for comparisons against the MLX model, the context uses
an F32 KV cache and no flash attention, so that llama.cpp's own rounding stays near float32 noise.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path

import numpy as np

GGML_TYPE_F32 = 0


@contextlib.contextmanager
def quiet(fd: int = 2):
    """Send file descriptor `fd` to /dev/null for a while.

    llama.cpp logs straight to fd 2 while loading (and SentencePiece's trainer to fd 1), past Python's
    sys.stderr/sys.stdout, so only redirecting the descriptor keeps test and benchmark output readable.
    """
    import sys

    (sys.stdout if fd == 1 else sys.stderr).flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def build_features() -> str:
    """The CPU features this llama.cpp build uses, as it reports them (e.g. 'AVX2 = 1 | F16C = 1 | ...')."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode()


def emulated_f16_build() -> bool:
    """Whether this is the portable AVX2/F16C build whose F16 rounding the tests emulate exactly (the Makefile's).

    A native build on an AVX512 machine rounds F16 matmuls otherwise: its logits are held to the measured
    bound only.
    """
    features = build_features()
    return "AVX512" not in features and "F16C = 1" in features


def load(path: str | os.PathLike, n_ctx: int = 128):
    """A llama_cpp.Llama for `path` with full-precision KV cache and logits for every position."""
    from llama_cpp import Llama

    with quiet():
        return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                     type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False, n_threads=1, n_threads_batch=1,
                     n_gpu_layers=0, verbose=False, seed=0)


def logits(path_or_llm, ids) -> np.ndarray:
    """llama.cpp's logits (len(ids), n_vocab) for one token sequence."""
    llm = load(path_or_llm) if isinstance(path_or_llm, (str, os.PathLike)) else path_or_llm
    llm.reset()
    with quiet():
        llm.eval(list(int(i) for i in ids))
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def tokenize(path_or_llm, text: str, add_bos: bool = False) -> list[int]:
    """llama.cpp's tokenization of `text`, special tokens parsed."""
    llm = load(path_or_llm) if isinstance(path_or_llm, (str, os.PathLike)) else path_or_llm
    return llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)


def quantize(src: str | os.PathLike, dst: str | os.PathLike, ftype: int, threads: int = 2) -> Path:
    """llama-quantize (the library call behind the tool) from `src` to `dst` with llama_ftype `ftype`."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    with quiet():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc}) on {src}")
    return Path(dst)
