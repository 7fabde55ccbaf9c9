"""Hand a GGUF file to a chat app: an Ollama Modelfile, or LM Studio's models folder layout.

The one thing to know: Ollama does not run the model's Jinja chat template. It needs a TEMPLATE in Go's
`text/template` syntax, fed `.System` (all system messages joined) and `.Messages` (each with `.Role`
and `.Content`, consecutive same-role messages merged); without one it falls back to the raw prompt and
the model never stops. We recognise the common template families in the GGUF's own
`tokenizer.chat_template` and write the equivalent Go template plus a `PARAMETER stop` per end-of-turn
token. BOS is not part of the template: llama.cpp adds it (`tokenizer.ggml.add_bos_token`).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from gguf import GGUFReader
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tqdm.auto import tqdm

from .errors import CheckError, ConfigError, ExportError
from .files import atomic_file, write_text_atomic

# Go templates for Ollama, one per chat-template family. `$last` marks the final message, after which the
# assistant header is opened (Ollama always renders a prompt for the next assistant turn).
GO_TEMPLATES = {
    "chatml": (
        "{{- range $i, $_ := .Messages }}\n"
        "{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n"
        "<|im_start|>{{ .Role }}\n"
        "{{ .Content }}<|im_end|>\n"
        "{{ if and $last (ne .Role \"assistant\") }}<|im_start|>assistant\n"
        "{{ end }}\n"
        "{{- end }}"
    ),
    "llama3": (
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>\n"
        "{{- end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    # Llama 3.1+: a system block is always written, opening with fixed text (knowledge cutoff, date).
    "llama3-system": (
        "<|start_header_id|>system<|end_header_id|>\n\n@@PREFIX@@{{ .System }}<|eot_id|>\n"
        "{{- range .Messages }}{{ if ne .Role \"system\" }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>\n"
        "{{- end }}{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    # Mistral puts the system prompt inside the last [INST] block; a system message is not rendered itself.
    "mistral": (
        "{{- range $i, $_ := .Messages }}\n"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
        "{{- if eq .Role \"user\" }}[INST] {{ if and $.System $last }}{{ $.System }}\n\n"
        "{{ end }}{{ .Content }}@@INST_CLOSE@@\n"
        "{{- else if eq .Role \"assistant\" }}@@ASSISTANT_SPACE@@{{ .Content }}@@EOS@@\n"
        "{{- end }}\n"
        "{{- end }}"
    ),
    # Gemma has no system turn: the system prompt opens the first user turn.
    "gemma": (
        "{{- $first := true }}\n"
        "{{- range .Messages }}\n"
        "{{- if eq .Role \"user\" }}<start_of_turn>user\n"
        "{{ if and $first $.System }}{{ $.System }}\n\n"
        "{{ end }}{{ .Content }}<end_of_turn>\n"
        "{{ $first = false }}\n"
        "{{- else if eq .Role \"assistant\" }}<start_of_turn>model\n"
        "{{ .Content }}<end_of_turn>\n"
        "{{ end }}\n"
        "{{- end }}<start_of_turn>model\n"
    ),
    "phi3": (
        "{{- range .Messages }}<|{{ .Role }}|>\n"
        "{{ .Content }}<|end|>\n"
        "{{ end }}<|assistant|>\n"
    ),
}

# Markers that identify a family in a Jinja chat template, checked in this order.
FAMILY_MARKERS = [
    ("llama3", ("<|start_header_id|>",)),
    ("chatml", ("<|im_start|>",)),
    ("gemma", ("<start_of_turn>",)),
    ("phi3", ("<|user|>", "<|end|>")),
    ("mistral", ("[INST]",)),
]

# Tokens that end an assistant turn (or start the next one) in each family: generation stops there.
FAMILY_STOPS = {
    "chatml": ["<|im_end|>", "<|im_start|>"],
    "llama3": ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
    "mistral": ["[INST]", "[/INST]"],
    "gemma": ["<end_of_turn>", "<start_of_turn>"],
    "phi3": ["<|end|>", "<|user|>", "<|assistant|>", "<|endoftext|>"],
}


@dataclass
class GGUFChatInfo:
    """What a chat app needs from a GGUF file's metadata."""

    path: Path
    architecture: str | None
    name: str | None
    chat_template: str | None
    eos: str | None
    eot: str | None
    kind: str | None = None  # general.type: "model" or "adapter"


@dataclass
class OllamaExport:
    modelfile: Path
    name: str
    family: str | None
    stops: list[str]
    command: str
    notes: list[str] = field(default_factory=list)


def read_gguf_chat_info(gguf) -> GGUFChatInfo:
    """Chat template, EOS/EOT token text and token list from a GGUF file (memory-mapped, tensors unread)."""
    path = Path(gguf).expanduser()
    if not path.is_file():
        raise ExportError(f"--gguf {path}: no such file (write one with `mlxtune gguf --model DIR --outfile FILE`)")
    try:
        reader = GGUFReader(str(path))
    except Exception as e:
        raise ExportError(f"--gguf {path} is not a readable GGUF file ({type(e).__name__}: {e})") from None

    def value(key):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    tokens = value("tokenizer.ggml.tokens") or []
    if not tokens and value("general.type") != "adapter":
        raise ExportError(f"--gguf {path} has no tokenizer (tokenizer.ggml.tokens): re-export it with mlxtune gguf")

    def token(key):
        i = value(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    return GGUFChatInfo(path=path, architecture=value("general.architecture"), name=value("general.name"),
                        chat_template=value("tokenizer.chat_template"), eos=token("tokenizer.ggml.eos_token_id"),
                        eot=token("tokenizer.ggml.eot_token_id"), kind=value("general.type"))


def chat_family(template: str | None) -> str | None:
    """The chat-template family (chatml, llama3, mistral, gemma, phi3) of a Jinja template, or None."""
    if not template:
        return None
    for family, markers in FAMILY_MARKERS:
        if all(m in template for m in markers):
            return family
    return None


def go_template(family: str, jinja: str = "", eos: str | None = None) -> str:
    """Ollama's TEMPLATE for `family`; details that vary between releases are read from the Jinja text."""
    text = GO_TEMPLATES[family]
    if family == "llama3":
        prefix = llama3_system_prefix(jinja)
        if prefix is not None:
            text = GO_TEMPLATES["llama3-system"].replace("@@PREFIX@@", prefix)
    if family == "mistral":
        # v0.1/v0.2 write "[INST] x [/INST]answer</s>"; v0.3 writes "[INST] x[/INST] answer</s>".
        close = " [/INST]" if re.search(r"[\"'] \[/INST\]", jinja) else "[/INST]"
        space = " " if re.search(r"[\"'] [\"']\s*\+\s*message\[.content.\]", jinja) else ""
        text = (text.replace("@@INST_CLOSE@@", close).replace("@@ASSISTANT_SPACE@@", space)
                .replace("@@EOS@@", eos or "</s>"))
    return text


def default_system_prompt(template: str | None) -> str | None:
    """The system prompt a ChatML template inserts when the conversation has none (Qwen2.5 does), else None.

    Ollama has no such branch in a Go template; the Modelfile's SYSTEM line is its equivalent (sent as the
    system message whenever the request has none).
    """
    text = _render(template, [{"role": "user", "content": "\x00"}])
    if text is None:
        return None
    head = "<|im_start|>system\n"
    if not text.startswith(head) or "<|im_end|>" not in text:
        return None
    system = text[len(head):text.index("<|im_end|>")]
    return system if "\x00" not in system else None


LLAMA3_SYSTEM_HEAD = "<|start_header_id|>system<|end_header_id|>\n\n"


def llama3_system_prefix(template: str | None) -> str | None:
    """The fixed text a Llama-3.1-style template always writes in its system block before the system message.

    None when the template writes no system block of its own (Llama 3.0). The date such templates print is
    the one they fall back to without `strftime_now`, fixed at export time.
    """
    bare = _render(template, [{"role": "user", "content": "\x00"}])
    with_system = _render(template, [{"role": "system", "content": "\x01"}, {"role": "user", "content": "\x00"}])
    if not bare or not with_system or not bare.startswith(LLAMA3_SYSTEM_HEAD) or "<|eot_id|>" not in bare:
        return None
    prefix = bare[len(LLAMA3_SYSTEM_HEAD):bare.index("<|eot_id|>")]
    if "\x00" in prefix or "{{" in prefix or not with_system.startswith(f"{LLAMA3_SYSTEM_HEAD}{prefix}\x01<|eot_id|>"):
        return None
    return prefix


class TemplateRenderError(ExportError):
    """The Jinja chat template cannot be rendered outside its app (it needs context we do not give it)."""


def _render(template: str | None, messages: list[dict]) -> str | None:
    """The Jinja chat template rendered as transformers does (BOS left out); None without a template.

    Raises TemplateRenderError for a template that fails here (raise_exception, strftime_now and other
    helpers only its app defines, or a bug): the caller says what it could not do.
    """
    if not template:
        return None
    try:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token="",
                                                eos_token="")
    except (jinja2.TemplateError, TypeError) as e:
        raise TemplateRenderError(f"{type(e).__name__}: {e}") from None


def stop_tokens(info: GGUFChatInfo, family: str | None) -> list[str]:
    """Every end-of-turn string: the family's turn markers, then the GGUF's EOT and EOS tokens.

    Ollama matches stops on the generated text, so a marker that is plain text in this vocabulary (Mistral
    v0.1's `[INST]`) still stops a reply that starts the next turn.
    """
    stops: list[str] = []
    for s in [*FAMILY_STOPS.get(family, []), info.eot, info.eos]:
        if s and s not in stops:
            stops.append(s)
    return stops


def _ollama_name(text: str) -> str:
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return name or "model"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(info: GGUFChatInfo, from_ref: str, adapter_ref: str | None = None,
                   system: str | None = None) -> tuple[str, str | None, list[str], list[str]]:
    """The Modelfile for `info` -> (text, family, stops, notes)."""
    notes: list[str] = []
    family = chat_family(info.chat_template)
    lines = [f"# Written by mlxtune from {info.path.name}", f"FROM {from_ref}"]
    if adapter_ref:
        lines.append(f"ADAPTER {adapter_ref}")
    if family:
        try:
            template = go_template(family, info.chat_template or "", info.eos)
        except TemplateRenderError as e:
            notes.append(f"the chat template cannot be rendered here ({e}): the {family} TEMPLATE is written in "
                         "its common form; compare it with the Jinja template before relying on it")
            template = go_template(family, "", info.eos)
        lines.append(f'TEMPLATE """{template}"""')
    elif info.chat_template:
        notes.append("the chat template is not one of ChatML, Llama-3, Mistral [INST], Gemma, Phi-3: no TEMPLATE "
                     "written (Ollama will send raw prompts); the Jinja template is in the Modelfile as a comment "
                     "to translate by hand")
        lines.append("# Chat template (Jinja) to translate into a Go TEMPLATE by hand:")
        lines.extend("# " + line for line in info.chat_template.splitlines())
    else:
        notes.append("the GGUF file has no chat template (tokenizer.chat_template): no TEMPLATE written, "
                     "Ollama will send raw prompts")
    stops = stop_tokens(info, family)
    lines.extend(f"PARAMETER stop {_quote(s)}" for s in stops)
    if system is None and family == "chatml":
        try:
            system = default_system_prompt(info.chat_template)
        except TemplateRenderError as e:
            notes.append(f"the chat template cannot be rendered here ({e}), so a default system prompt it may add "
                         "is not written as SYSTEM: pass --system TEXT to set one")
        if system:
            notes.append("the chat template adds a default system prompt when none is given: written as SYSTEM")
    if system:
        if '"""' in system:
            raise ExportError('--system cannot contain """ (the Modelfile quotes it with triple quotes)')
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n", family, stops, notes


def export_ollama(gguf, name: str | None = None, out=None, *, adapter=None, system: str | None = None,
                  force: bool = False) -> OllamaExport:
    """Write `Modelfile` for `gguf` (a model, or a base model when `adapter` is a LoRA GGUF) into `out`.

    out: directory for the Modelfile (default: the GGUF file's directory). name: the Ollama model name
    (default: from the file name). Returns the Modelfile path and the `ollama create` command to run.
    """
    info = read_gguf_chat_info(gguf)
    if info.kind == "adapter":
        raise ExportError(f"--gguf {info.path} is a LoRA adapter: give the base model's GGUF with --gguf and "
                          f"the adapter with --adapter")
    out = Path(out).expanduser() if out else info.path.parent
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file: give a directory for the Modelfile")
    modelfile = out / "Modelfile"
    if modelfile.exists() and not force:
        raise ExportError(f"{modelfile} already exists: choose another --out or pass --force to replace it")
    name = _ollama_name(name or info.path.stem)

    def ref(path: Path) -> str:
        path = path.resolve()
        return f"./{path.name}" if path.parent == out.resolve() else str(path)

    adapter_ref = None
    if adapter:
        adapter_info = read_gguf_chat_info(adapter)
        if adapter_info.kind != "adapter":
            raise ExportError(f"--adapter {adapter_info.path} is not a LoRA adapter GGUF "
                              "(write one with `mlxtune adapters export --to gguf`)")
        if adapter_info.architecture != info.architecture:
            raise ExportError(f"--adapter {adapter_info.path} is for a {adapter_info.architecture} model but "
                              f"{info.path} is {info.architecture}: use the GGUF of the adapter's base model")
        adapter_ref = ref(adapter_info.path)
    text, family, stops, notes = modelfile_text(info, ref(info.path), adapter_ref, system)
    write_text_atomic(modelfile, text)
    command = f"ollama create {name} -f {modelfile}"
    return OllamaExport(modelfile=modelfile, name=name, family=family, stops=stops, command=command, notes=notes)


def lmstudio_models_dir() -> Path:
    """LM Studio's models folder: $LMSTUDIO_MODELS_DIR, else ~/.lmstudio/models."""
    return Path(os.environ.get("LMSTUDIO_MODELS_DIR") or "~/.lmstudio/models").expanduser()


def export_lmstudio(gguf, publisher: str = "mlxtune", name: str | None = None, models_dir=None, *,
                    link: bool = False, force: bool = False) -> Path:
    """Place `gguf` at `<models_dir>/<publisher>/<name>/<file>.gguf`, the layout LM Studio scans.

    A file directly in `models/` is ignored by LM Studio, hence the two folder levels. link: make a symbolic
    link instead of copying. Returns the placed path.
    """
    src = Path(gguf).expanduser()
    if not src.is_file():
        raise ExportError(f"--gguf {src}: no such file (write one with `mlxtune gguf --model DIR --outfile FILE`)")
    if src.suffix.lower() != ".gguf":
        raise ExportError(f"--gguf {src}: LM Studio only lists files ending in .gguf; rename it")
    with open(src, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ExportError(f"--gguf {src} is not a GGUF file (it starts with {magic!r}, not b'GGUF'): write one with "
                          "`mlxtune gguf --model DIR --outfile FILE`")
    for flag, part in (("--publisher", publisher), ("--name", name)):
        if part is not None and (not part or "/" in part or part in (".", "..")):
            raise ExportError(f"{flag} {part!r}: give one folder name (no '/')")
    root = Path(models_dir).expanduser() if models_dir else lmstudio_models_dir()
    dest = root / publisher / (name or src.stem) / src.name
    if dest.exists() or dest.is_symlink():
        if dest.resolve() == src.resolve():
            return dest
        if not force:
            raise ExportError(f"{dest} already exists: pass --force to replace it, or choose another --name")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if link:
        tmp = dest.with_name(f".{dest.name}.link")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(src.resolve())
        os.replace(tmp, dest)
    else:
        with atomic_file(dest) as tmp:
            _copy_with_progress(src, tmp)
    return dest


def _copy_with_progress(src: Path, dst: Path, chunk: int = 64 << 20) -> None:
    size = src.stat().st_size
    with open(src, "rb") as fi, open(dst, "wb") as fo, tqdm(total=size, unit="B", unit_scale=True,
                                                              desc=f"copy {src.name}", disable=size < chunk) as bar:
        while block := fi.read(chunk):
            fo.write(block)
            bar.update(len(block))
    shutil.copystat(src, dst)


@dataclass
class ChatExport:
    gguf: Path
    fused: Path
    ollama: OllamaExport | None = None
    lmstudio: Path | None = None


def export_chat(model, adapter_file, out, *, app: str = "ollama", gguf_type: str = "q8_0", name: str | None = None,
                publisher: str = "mlxtune", models_dir=None, force: bool = False, keep_adapter: bool = False,
                verify: bool = False, data=None, n: int | None = None, log=print) -> ChatExport:
    """One shot from an adapter to a chat-ready file: fuse (de-quantized) -> GGUF -> Ollama Modelfile / LM Studio.

    out: a new directory receiving `fused/`, `<name>.gguf` and (for Ollama) the Modelfile.
    app: "ollama", "lmstudio" or "both". keep_adapter: fine-tune-aware quantization (needs `data`).
    verify: before anything is placed for the app, run `mlxtune compare`'s check on the test split of `data`
    (the first `n` rows) with the GGUF in llama.cpp; when it fails, CheckError is raised and no Modelfile is
    written and nothing is copied into LM Studio (fused/ and the GGUF stay in `out` to inspect).
    """
    # Heavy (mlx-lm pulls in transformers): only this one-shot path fuses; exporting a GGUF never needs it.
    from .comparison import compare
    from .fusion import fuse

    if app not in ("ollama", "lmstudio", "both"):
        raise ConfigError(f"--app {app}: choose ollama, lmstudio or both")
    if (verify or keep_adapter) and data is None:
        raise ConfigError(f"--{'verify' if verify else 'keep-adapter'} needs --data (the adapter's data folder, "
                          "with test.jsonl for --verify and train.jsonl for --keep-adapter)")
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} already exists and is not empty: choose another --out or pass --force")
    name = _ollama_name(name or Path(str(model)).name)
    gguf = out / f"{name}-{gguf_type}.gguf"
    fused = out / "fused"
    fuse(model, adapter_file, fused, de_quantize=True, gguf=gguf, gguf_type=gguf_type, force=force,
         keep_adapter=keep_adapter, data=data, log=log)
    if verify:
        checked = compare(model, adapter_file, gguf=[gguf], data=data, n=n, base=False, log=log)
        try:
            checked.check()
        except CheckError as e:
            raise CheckError(f"{e}; nothing was placed into Ollama or LM Studio (the GGUF is at {gguf})") from None
        log(f"verified: {checked.stages[-1].stage} keeps {checked.stages[-1].exact_match:.1%} exact match "
            f"(adapter {checked.stage('adapter').exact_match:.1%}) on {checked.n} rows of {checked.data}")
    result = ChatExport(gguf=gguf, fused=fused)
    if app in ("ollama", "both"):
        result.ollama = export_ollama(gguf, name, out, force=force)
    if app in ("lmstudio", "both"):
        result.lmstudio = export_lmstudio(gguf, publisher, name, models_dir, force=force)
    return result
