"""What each supported architecture looks like in GGUF: its metadata keys, tensor names and the few
places where llama.cpp's weights differ from Hugging Face's.

The one thing to know: llama.cpp reads RoPE for the `llama` architecture in the interleaved (GPT-J)
layout, so q/k rows of llama/mistral models are permuted here; every other architecture here uses the
NeoX layout and is written as it is. Gemma stores norm weights as `w` with `1 + w` applied at run time,
llama.cpp wants the `1 + w` itself.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import gguf
import numpy as np

from ..errors import ExportError, ModelLoadError


@dataclass(frozen=True)
class Arch:
    """A GGUF architecture and the weight adjustments it needs."""

    name: str                   # `general.architecture`
    model_arch: gguf.MODEL_ARCH
    permute_qk: bool = False    # llama: interleaved RoPE
    norm_offset: float = 0.0    # gemma: norm weights stored as w, used as 1 + w
    output_allowed: bool = True  # gemma/gemma2 always share the embedding; an output tensor breaks the load


ARCHES = {
    "llama": Arch("llama", gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": Arch("qwen2", gguf.MODEL_ARCH.QWEN2),
    "qwen3": Arch("qwen3", gguf.MODEL_ARCH.QWEN3),
    "gemma": Arch("gemma", gguf.MODEL_ARCH.GEMMA, norm_offset=1.0, output_allowed=False),
    "gemma2": Arch("gemma2", gguf.MODEL_ARCH.GEMMA2, norm_offset=1.0, output_allowed=False),
    "gemma3": Arch("gemma3", gguf.MODEL_ARCH.GEMMA3, norm_offset=1.0),
    "phi3": Arch("phi3", gguf.MODEL_ARCH.PHI3),
}
# config.json model_type -> GGUF architecture
MODEL_TYPES = {
    "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
    "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3", "phi3": "phi3",
}
# Multimodal checkpoints: the language model's tensors under these prefixes, everything else skipped.
_TEXT_PREFIXES = [("language_model.model.", "model."), ("model.language_model.", "model."),
                  ("language_model.lm_head.", "lm_head.")]
_SKIP = re.compile(r"(^|\.)(rotary_emb\.inv_freq|vision_tower|vision_model|multi_modal_projector)(\.|$)")
# Defaults transformers fills in when a key is absent (config.json files are often sparse).
_DEFAULTS = {
    "gemma3": dict(max_position_embeddings=131072, num_attention_heads=8, num_key_value_heads=4,
                   rms_norm_eps=1e-6, head_dim=256, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                   sliding_window=4096),
    "gemma": dict(head_dim=256, rms_norm_eps=1e-6),
    "gemma2": dict(head_dim=256, rms_norm_eps=1e-6, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, sliding_window=4096),
}


def supported_model_types() -> list[str]:
    return sorted(MODEL_TYPES)


def resolve_arch(config: dict, where: str = "config.json") -> tuple[Arch, dict]:
    """The GGUF architecture of a (normalized) HF config, and the text-model config to read keys from."""
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ExportError(
            f"architecture {model_type!r} in {where} cannot be written as GGUF; "
            f"supported: {', '.join(supported_model_types())}"
        )
    arch = ARCHES[MODEL_TYPES[model_type]]
    text = config
    if model_type == "gemma3" and isinstance(config.get("text_config"), dict):
        text = {**config["text_config"]}
        text.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", True))
    text = {**_DEFAULTS.get(arch.name, {}), **{k: v for k, v in text.items() if v is not None}}
    if arch.name.startswith("gemma"):
        text.setdefault("tie_word_embeddings", True)
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size"):
        if key not in text:
            raise ExportError(f"{where} has no {key!r}: cannot describe the model to llama.cpp")
    return arch, text


def text_tensor_name(name: str) -> str | None:
    """The name `name` (as stored, maybe inside a multimodal checkpoint) has in the text-only model llama.cpp
    loads, or None for tensors outside the language model."""
    for old, new in _TEXT_PREFIXES:
        if name.startswith(old):
            name = new + name[len(old):]
            break
    if _SKIP.search(name):
        return None
    return name


def tensor_namer(arch: Arch, n_layers: int):
    """A function HF name -> GGUF name that refuses tensors llama.cpp's `arch` does not load."""
    mapping = gguf.get_tensor_name_map(arch.model_arch, n_layers)
    allowed = set()
    for t in gguf.MODEL_TENSORS[arch.model_arch]:
        template = gguf.TENSOR_NAMES[t]
        allowed.update({template.format(bid=i) for i in range(n_layers)} if "{bid}" in template else {template})

    def name_of(hf: str) -> str:
        new = mapping.get_name(hf, try_suffixes=(".weight", ".bias"))
        if new is None or new.rsplit(".", 1)[0] not in allowed:
            raise ExportError(
                f"tensor {hf!r} has no place in llama.cpp's {arch.name} architecture "
                "(is the model fused? LoRA or extra heads cannot go into a model GGUF)"
            )
        return new

    return name_of


def head_dim(cfg: dict) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def qk_permutation(rows: int, n_head: int) -> np.ndarray:
    """Row order turning HF's half-split RoPE layout into llama.cpp's interleaved one (new[i] = old[p[i]])."""
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def _rope_scaling(cfg: dict) -> dict:
    scaling = cfg.get("rope_scaling") or {}
    kind = (scaling.get("rope_type") or scaling.get("type") or "default").lower()
    return {**scaling, "kind": kind}


def add_metadata(w: gguf.GGUFWriter, arch: Arch, cfg: dict) -> None:
    """Hyper-parameter keys llama.cpp reads for `arch`, from the text-model config `cfg`."""
    n_head = cfg["num_attention_heads"]
    hd = head_dim(cfg)
    w.add_context_length(int(cfg.get("max_position_embeddings") or cfg.get("max_seq_len") or 4096))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(cfg.get("num_key_value_heads") or n_head)
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    if cfg.get("head_dim"):
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    scaling = _rope_scaling(cfg)
    kind = scaling["kind"]

    if arch.name == "phi3":
        rot = float(cfg.get("partial_rotary_factor", 1.0))
        w.add_rope_dimension_count(int(rot * cfg["hidden_size"]) // n_head)
        orig = scaling.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings")
        w.add_rope_scaling_orig_ctx_len(int(orig or cfg.get("max_position_embeddings", 4096)))
        # zero tells llama.cpp there is no sliding window (Phi-4 style); Phi-3 mini sets one
        w.add_sliding_window(int(cfg.get("sliding_window") or 0))
        if kind in ("longrope", "su"):
            ctx, orig = cfg["max_position_embeddings"], int(orig or cfg["max_position_embeddings"])
            s = ctx / orig
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(s) / math.log(orig)) if s > 1 else 1.0)
        elif kind != "default":
            raise ExportError(f"phi3 RoPE scaling {kind!r} is not supported (only longrope)")
        return

    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(scaling["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))
        for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if scaling.get(key) is not None:
                add(float(scaling[key]))
    elif kind == "llama3":
        if arch.name != "llama":
            raise ExportError(f"llama3 RoPE scaling on a {arch.name} model is not supported")
        # written as the `rope_freqs` tensor (see extra_tensors), no key
    elif kind != "default":
        raise ExportError(f"RoPE scaling {kind!r} cannot be written for {arch.name} (supported: linear, yarn, llama3)")

    if arch.name == "llama":
        w.add_vocab_size(cfg["vocab_size"])
        w.add_rope_dimension_count(hd)
    elif arch.name == "gemma2":
        w.add_attn_logit_softcapping(float(cfg["attn_logit_softcapping"]))
        w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
        w.add_sliding_window(int(cfg["sliding_window"]))
    elif arch.name == "gemma3":
        if cfg.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
        w.add_rope_freq_base_swa(float(cfg.get("rope_local_base_freq", 10000.0)))
        if cfg.get("sliding_window"):
            w.add_sliding_window(int(cfg["sliding_window"]))
            pattern = _gemma3_sliding(cfg)
            default = [(i + 1) % 6 != 0 for i in range(cfg["num_hidden_layers"])]
            if pattern != default:
                # llama.cpp assumes 5 local : 1 global unless told; only then write the per-layer list
                w.add_sliding_window_pattern(pattern)


def _gemma3_sliding(cfg: dict) -> list[bool]:
    n = cfg["num_hidden_layers"]
    if isinstance(cfg.get("layer_types"), list):
        return [t == "sliding_attention" for t in cfg["layer_types"]]
    every = int(cfg.get("sliding_window_pattern") or 6)
    return [(i + 1) % every != 0 for i in range(n)]


def extra_tensors(arch: Arch, cfg: dict) -> dict[str, np.ndarray]:
    """Tensors llama.cpp wants that the checkpoint does not store (RoPE frequency factors)."""
    scaling = _rope_scaling(cfg)
    if arch.name == "llama" and scaling["kind"] == "llama3":
        dim = head_dim(cfg)
        base = float(cfg.get("rope_theta", 10000.0))
        factor = float(scaling.get("factor", 8.0))
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
        wavelen = 2 * math.pi / freqs
        smooth = (old_ctx / wavelen - low) / (high - low)
        factors = np.where(wavelen < old_ctx / high, 1.0,
                           np.where(wavelen > old_ctx / low, factor, 1 / ((1 - smooth) / factor + smooth)))
        return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": factors.astype(np.float32)}
    if arch.name == "phi3" and scaling["kind"] in ("longrope", "su"):
        long, short = scaling.get("long_factor"), scaling.get("short_factor")
        if not long or not short:
            raise ExportError("phi3 longrope scaling needs long_factor and short_factor in config.json")
        return {
            gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight": np.asarray(long, np.float32),
            gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight": np.asarray(short, np.float32),
        }
    return {}


# ---------------------------------------------------------------- reading a GGUF file back (the inverse)

# GGUF architecture -> config.json model_type (Mistral files say `llama`: the same network).
GGUF_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
                    "gemma2": "gemma2", "gemma3": "gemma3_text", "phi3": "phi3"}
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
                  "phi3": "Phi3ForCausalLM"}


def qk_unpermutation(rows: int, n_head: int) -> np.ndarray:
    """Row order turning llama.cpp's interleaved RoPE rows back into HF's half-split layout."""
    return np.argsort(qk_permutation(rows, n_head))


def gguf_names(arch: Arch, n_layers: int, hf_names) -> dict[str, str]:
    """GGUF name -> HF name for the HF parameter names `hf_names`, through the writer's own namer.

    The mapping runs forward (HF -> GGUF, one table for both directions) over the names the target
    model has, so the inverse is exact for that model whatever aliases gguf's table holds.
    """
    name_of = tensor_namer(arch, n_layers)
    return {name_of(h): h for h in hf_names}


def _llama3_scaling(factors: np.ndarray, dim: int, base: float) -> dict | None:
    """The llama3 rope_scaling whose frequency factors (see extra_tensors) are `factors`, or None."""
    factor = float(factors.max())
    for old_ctx in (8192, *[2 ** k for k in range(4, 21)]):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0)):
            cfg = {"rope_theta": base, "head_dim": dim, "hidden_size": dim, "num_attention_heads": 1,
                   "rope_scaling": {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                                    "high_freq_factor": high, "original_max_position_embeddings": old_ctx}}
            want = extra_tensors(ARCHES["llama"], cfg)
            values = next(iter(want.values()))
            if values.shape == factors.shape and np.allclose(values, factors, rtol=1e-5, atol=0):
                return cfg["rope_scaling"]
    return None


def config_from_gguf(g, read_f32) -> dict:
    """config.json for the GGUF file `g` (a reader.GGUFFile): the inverse of `add_metadata`.

    read_f32(name) returns a small F32 tensor (RoPE factors). Raises ModelLoadError for an
    architecture or setting mlxtune cannot express.
    """
    name = g.arch
    if name not in GGUF_MODEL_TYPES:
        raise ModelLoadError(f"{g.path}: architecture {name!r} cannot be imported; supported: "
                             f"{', '.join(GGUF_MODEL_TYPES)}")

    def need(key: str):
        value = g.get(key)
        if value is None:
            raise ModelLoadError(f"{g.path} has no {key.format(arch=name)}: cannot describe the model")
        if isinstance(value, np.ndarray):
            if value.size and (value == value.flat[0]).all():
                return value.flat[0].item()  # a per-layer list with one value
            raise ModelLoadError(f"{g.path}: {key.format(arch=name)} differs per layer, which mlx-lm's {name} cannot express")
        return value

    n_head = int(need("{arch}.attention.head_count"))
    hidden = int(need("{arch}.embedding_length"))
    embd = g.tensors.get("token_embd.weight")
    if embd is None:
        raise ModelLoadError(f"{g.path} has no token_embd.weight: not a complete language model")
    cfg = {
        "model_type": GGUF_MODEL_TYPES[name],
        "architectures": [_ARCHITECTURES[GGUF_MODEL_TYPES[name]]],
        "hidden_size": hidden,
        "num_hidden_layers": int(need("{arch}.block_count")),
        "intermediate_size": int(need("{arch}.feed_forward_length")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(need("{arch}.attention.head_count_kv")
                                   if g.get("{arch}.attention.head_count_kv") is not None else n_head),
        "rms_norm_eps": float(need("{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(g.get("{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(g.get("{arch}.context_length", 4096)),
        "vocab_size": embd.shape[0],
        "tie_word_embeddings": "output.weight" not in g.tensors,
    }
    hd = g.get("{arch}.attention.key_length")
    if hd is not None:
        cfg["head_dim"] = int(hd)
    elif name.startswith("gemma") or name == "qwen3":
        cfg["head_dim"] = hidden // n_head
    dim = int(cfg.get("head_dim") or hidden // n_head)

    kind = g.get("{arch}.rope.scaling.type")
    if kind in ("linear", "yarn"):
        scaling = {"rope_type": kind, "type": kind, "factor": float(need("{arch}.rope.scaling.factor"))}
        if kind == "yarn":
            scaling["original_max_position_embeddings"] = int(need("{arch}.rope.scaling.original_context_length"))
            for key, hf in (("extrapolation_factor", "yarn_ext_factor"), ("attention_factor", "yarn_attn_factor"),
                            ("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
                if g.get("{arch}.rope.scaling." + hf) is not None:
                    scaling[key] = float(g.get("{arch}.rope.scaling." + hf))
        cfg["rope_scaling"] = scaling
    elif kind not in (None, "none") and name != "phi3":
        raise ModelLoadError(f"{g.path}: RoPE scaling {kind!r} cannot be imported (supported: linear, yarn, llama3)")
    freqs = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    if freqs in g.tensors:
        scaling = _llama3_scaling(read_f32(freqs), dim, cfg["rope_theta"]) if name == "llama" else None
        if scaling is None:
            raise ModelLoadError(f"{g.path}: tensor {freqs} holds RoPE frequency factors that are not llama3 "
                                 "scaling: mlx-lm cannot run them")
        scaling["type"] = "llama3"
        cfg["rope_scaling"] = scaling

    if name == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in g.tensors
        cfg["mlp_bias"] = "blk.0.ffn_up.bias" in g.tensors
        rot = g.get("{arch}.rope.dimension_count")
        if rot is not None and int(rot) != dim:
            raise ModelLoadError(f"{g.path}: llama.rope.dimension_count {rot} differs from the head size {dim}")
    elif name.startswith("gemma"):
        cfg["hidden_activation"] = "gelu_pytorch_tanh"
        # llama.cpp scales attention by 1/sqrt(head_dim) (see the writer's notes)
        cfg["query_pre_attn_scalar"] = dim
        if name == "gemma2":
            cfg["attn_logit_softcapping"] = float(g.get("{arch}.attn_logit_softcapping", 50.0))
            cfg["final_logit_softcapping"] = float(g.get("{arch}.final_logit_softcapping", 30.0))
            cfg["sliding_window"] = int(g.get("{arch}.attention.sliding_window", 4096))
        elif name == "gemma3":
            cfg["rope_local_base_freq"] = float(g.get("{arch}.rope.freq_base_swa", 10000.0))
            if g.get("{arch}.final_logit_softcapping"):
                cfg["final_logit_softcapping"] = float(g.get("{arch}.final_logit_softcapping"))
            cfg["sliding_window"] = int(g.get("{arch}.attention.sliding_window", 512))
            pattern = g.get("{arch}.attention.sliding_window_pattern")
            n = cfg["num_hidden_layers"]
            sliding = [bool(x) for x in pattern] if pattern is not None else [(i + 1) % 6 != 0 for i in range(n)]
            every = sliding.index(False) + 1 if False in sliding else n + 1
            if sliding != [(i + 1) % every != 0 for i in range(n)]:
                raise ModelLoadError(f"{g.path}: gemma3 sliding-window layers {sliding} are not periodic, "
                                     "which mlx-lm's gemma3 cannot express")
            cfg["sliding_window_pattern"] = every
            cfg["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
    elif name == "phi3":
        rot = int(g.get("{arch}.rope.dimension_count", dim))
        cfg["partial_rotary_factor"] = rot * n_head / hidden
        orig = int(g.get("{arch}.rope.scaling.original_context_length", cfg["max_position_embeddings"]))
        cfg["original_max_position_embeddings"] = orig
        if g.get("{arch}.attention.sliding_window"):
            cfg["sliding_window"] = int(g.get("{arch}.attention.sliding_window"))
        long_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight"
        short_name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight"
        if long_name in g.tensors and short_name in g.tensors:
            cfg["rope_scaling"] = {"type": "longrope", "rope_type": "longrope",
                                   "long_factor": read_f32(long_name).tolist(),
                                   "short_factor": read_f32(short_name).tolist()}
    return cfg
