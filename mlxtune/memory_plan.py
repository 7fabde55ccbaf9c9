"""Memory planning: the peak memory a LoRA run will need, known before its first step, and settings that fit.

`mlxtune.plan(...)` / `mlxtune plan` take the settings of `mlxtune lora` and add up: the base weights (by
dtype and bits), the LoRA parameters with their gradients and optimizer state, the activations of the
largest micro-batch the data will produce (the exact batches `mlxtune.data` yields, trimmed and gathered as
`mlxtune.loss.batch_arrays` does, so the vocabulary projection counts target positions only), and the
temporaries of the compiled step. `mlxtune lora` runs the same estimate first and refuses a run that does
not fit the budget (`--force` starts anyway; `--auto-fit` picks batch size, accumulation and checkpointing).

The one thing to know: the estimate is of what the training report's `Peak mem` shows (`mx.get_peak_memory`,
MLX's allocations, not the process's RSS). The activation terms are the shapes of the step's tensors (tokens x
blocks x widths, heads x length^2 for attention) times coefficients measured on MLX's CPU backend by
`benchmarks/memory_plan.py` (`ACTIVATION`, `CHECKPOINTED`); Metal runs the same graph, CUDA's torch has its
own allocator and autograd, so the torch estimate reuses the shapes and says it is a rougher guess.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .backends import select_backend
from .data import PAD_MULTIPLE, is_lazy, iterate_batches, load_dataset, micro_batches, round_up
from .defaults import DEFAULT_LORA_CONFIG, fill_in
from .dequantized import dequantized_layers, on_cpu
from .display import fields_html
from .errors import ConfigError
from .files import proc_field_bytes
from .layers import MLP_MODULES, LoRALinear, apply_lora, transformer_blocks
from .loss import _find_parts, batch_arrays, head_kept, head_slice
from .models import load_model
from .settings import TrainingArgs, normalize_keys, read_config_file, training_args

GB = 1e9  # the report's `Peak mem` is in 1e9 bytes; so is everything here

# Bytes of activations per micro-batch, as multiples of the shapes below, fitted (non-negative least squares) to
# MLX CPU measurements of one compiled step: random llamas 64-384 wide with 2-4 blocks, plus SmolLM2-135M for the
# checkpointed case; benchmarks/memory_plan.py checks them end to end. The shapes: hidden = tokens x width x e,
# mlp = tokens x intermediate width x e, attention = rows x heads x length^2 x e (one block's attention matrix),
# head = target positions x vocabulary x 4 (float32 logits), where tokens = rows x length and e = bytes per
# activation element; "n_" terms are counted once per block the gradient flows through (from the first adapted
# block to the last), the others once (the block being differentiated, the step's temporaries).
ACTIVATION = {  # no gradient checkpointing: every block keeps what its backward needs
    "n_attention": 1.047, "n_hidden": 6.91, "n_mlp": 3.869, "n_lora_mlp": 0.092,
    "attention": 2.058, "hidden": 13.641, "mlp": 3.551, "head": 3.963, "packed_mask": 4.649,
    "head_weights": 6.0,
}
CHECKPOINTED = {  # --grad-checkpoint: blocks keep their inputs; one block at a time is recomputed
    "n_hidden": 0.655, "n_attention": 0.152, "attention": 2.938, "hidden": 29.127, "mlp": 6.22,
    "head": 2.448, "head_frozen": 0.137, "lora_mlp": 4.407, "head_weights": 8.8,
}
HALF_PRECISION = {False: 1.14, True: 1.0}  # 2-byte activations keep some float32 temporaries (softmax, norms)
EVALUATION = {"attention": 2.058, "hidden": 13.641, "mlp": 3.551, "head": 3.963,  # forward only: no saved blocks
              "head_weights": 5.5}
# "head_weights" = one vocabulary slice of a de-quantizing head as float32 (slice rows x hidden x 4): MLX's CPU
# de-quantization makes several full-size temporaries, and the compiled step overlaps about two slices'. Measured,
# not fitted: SmolLM2's 4-bit tied head, 64 rows, 4096-row slices: 52 MB forward, 68 MB forward and backward
# with the exps kept, 83 MB projecting again (as under checkpointing), against 9.4 MB for one slice.
MARGIN = 0.85  # settings suggested or chosen by --auto-fit leave the planner's 15% accuracy free under the budget
LAZY_SCAN_LIMIT = 64  # batches read ahead from lazily tokenized data (each read tokenizes its records)
SCAN_LIMIT = 5000  # batches read ahead of a run (the shapes repeat from epoch to epoch; this bounds the time)


@dataclass
class ModelShape:
    """What the estimate needs of a model: widths, depth, dtypes and where the LoRA layers are."""

    blocks: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    act_bytes: int  # bytes per activation element (the dtype the blocks compute in)
    weights: dict[str, int]  # "float32" / "4-bit" ... -> bytes of the base model's tensors
    lora_bytes: int  # LoRA parameters (float32 A and B)
    first_adapted: int  # index of the first block carrying a LoRA layer
    lora_mlp: bool  # LoRA on the MLP projections (their inputs are kept for the backward pass)
    gather: bool = True  # the loss gathers target positions before the vocabulary projection
    stages: bool = False  # the MLX loss may run a batch's rows in stages after a shared prefix (`loss._stages`)
    head_vocab: int = 0  # vocabulary rows whose logits exist at once (loss.head_slice; 0: the whole vocab)
    head_dequantized: bool = False  # the sliced head de-quantizes its slices (a quantized head on the CPU)
    head_capped: bool = False  # final logit soft-capping (Gemma 2): the sliced head keeps no exps

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def grad_blocks(self) -> int:
        return self.blocks - self.first_adapted


@dataclass(frozen=True)
class MicroBatch:
    """The shape of one micro-batch as the compiled step sees it."""

    rows: int
    length: int
    targets: int  # positions that reach the vocabulary projection (gathered and bucketed, or all)
    packed: bool
    # How the MLX loss runs it when it shares a prefix and stages rows (`loss.batch_arrays`): (rows, columns)
    # of each stage after `prefix` columns run once; () when it cannot (packed, or a model that does not stage).
    stages: tuple[tuple[int, int], ...] = ()
    prefix: int = 0


@dataclass
class Estimate:
    """The breakdown of one setting's peak, in bytes."""

    weights: int
    lora: int
    grads: int
    optimizer: int
    activations: int
    batch: MicroBatch | None
    settings: dict  # batch_size, grad_accumulation, grad_checkpoint
    stages: bool = False  # training runs the batches' rows in stages (`MicroBatch.stages`) unless checkpointing

    @property
    def peak(self) -> int:
        return self.weights + self.lora + self.grads + self.optimizer + self.activations


@dataclass
class Plan:
    """`mlxtune.plan`'s answer: the estimate, the budget and (when it does not fit) settings that would."""

    estimate: Estimate
    budget: int
    budget_source: str
    shape: ModelShape
    suggestion: Estimate | None = None
    notes: list[str] = field(default_factory=list)  # under the breakdown `mlxtune plan` prints
    warnings: list[str] = field(default_factory=list)  # there too, and under the line `mlxtune lora` prints

    @property
    def fits(self) -> bool:
        return self.estimate.peak <= self.budget

    def last_line(self) -> str:
        return (f"Estimated peak memory: {self.estimate.peak / GB:.2f} GB (budget {self.budget / GB:.2f} GB): "
                f"{'fits' if self.fits else 'does not fit'}")

    def short_line(self) -> str:
        """The one line `mlxtune lora` prints before training."""
        e = self.estimate
        return (f"Memory plan: {_size(e.peak)} estimated peak ({_size(e.weights)} weights, {_size(e.activations)} "
                f"activations) of {_size(self.budget)} ({self.budget_source})")

    def report(self) -> str:
        """The breakdown `mlxtune plan` prints; its last line is `last_line()`."""
        s, e = self.shape, self.estimate
        lines = ["Weights:"]
        for kind, size in sorted(s.weights.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {kind:<32} {_size(size):>10}")
        lines += ["LoRA:",
                  f"  {'parameters':<32} {_size(e.lora):>10}",
                  f"  {'gradients' + (' + accumulator' if e.settings['grad_accumulation'] > 1 else ''):<32} "
                  f"{_size(e.grads):>10}",
                  f"  {'optimizer state':<32} {_size(e.optimizer):>10}"]
        b = e.batch
        if b is not None:
            staged = e.stages and (len(b.stages) > 1 or b.prefix)
            how = (f"; without checkpointing: {' + '.join(f'{r} x {c}' for r, c in b.stages)}"
                   + (" in stages" if len(b.stages) > 1 else "") + (f" after {b.prefix} shared" if b.prefix else "")
                   if staged else "")
            lines.append(f"Activations of the largest micro-batch ({b.rows} x {b.length} tokens{how}, {b.targets} "
                         f"positions through the {s.vocab}-word head{', packed' if b.packed else ''}):")
            for ckpt in (False, True):
                size = activation_bytes(s, b, ckpt, e.stages and not ckpt)
                mark = " <-" if ckpt == e.settings["grad_checkpoint"] else ""
                lines.append(f"  {('with' if ckpt else 'without') + ' gradient checkpointing':<32} {_size(size):>10}{mark}")
            lines.append(f"  (blocks with gradients: {s.grad_blocks} of {s.blocks}; compiled-step temporaries included)")
        lines.append(f"Budget: {_size(self.budget)} ({self.budget_source})")
        lines += self.notes + self.warnings
        if not self.fits:
            lines.append(self.advice())
        lines.append(self.last_line())
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.report()

    def _repr_html_(self) -> str:
        e = self.estimate
        rows = [("weights", _size(e.weights)), ("LoRA parameters", _size(e.lora)), ("gradients", _size(e.grads)),
                ("optimizer state", _size(e.optimizer)), ("activations", _size(e.activations)),
                ("estimated peak", _size(e.peak)), ("budget", f"{_size(self.budget)} ({self.budget_source})"),
                ("fits", "yes" if self.fits else "no"), ("settings that fit", None if self.fits else self.advice())]
        return fields_html("Memory plan", rows)

    def advice(self) -> str:
        if self.suggestion is not None:
            return (f"Settings that fit: {flags_of(self.suggestion.settings)} "
                    f"({_size(self.suggestion.peak)}, same effective batch)")
        return ("No batch size, accumulation or checkpointing fits: lower --max-seq-length or --lora-layers, "
                "or use a quantized model (--quantize)")


def _size(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def flags_of(settings: dict) -> str:
    text = f"--batch-size {settings['batch_size']} --grad-accumulation {settings['grad_accumulation']}"
    return text + (" --grad-checkpoint" if settings["grad_checkpoint"] else "")


# ------------------------------------------------------------------------------------------------ shapes


def _arg(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is None and isinstance(config, dict):
            value = config.get(name)
        if value:
            return value
    return default


def model_shape(model: nn.Module, gather: bool | None = None, *, engine: str = "mlx") -> ModelShape:
    """Read a model (loaded lazily or not, LoRA layers applied) without evaluating any of its weights.
    `engine`: whose loss and arithmetic will run. The torch engine projects onto the whole vocabulary and
    computes in the weights' dtype; MLX on the CPU computes in float32 (`mlxtune.dequantized`)."""
    config = getattr(model, "args", None) or getattr(model, "config", None) or {}
    text = getattr(config, "text_config", None)
    if isinstance(text, dict):  # multimodal configs nest the language model's numbers
        config = text
    blocks = transformer_blocks(model)
    hidden = int(_arg(config, "hidden_size", "d_model", default=0))
    heads = int(_arg(config, "num_attention_heads", "n_head", default=1))
    inter = int(_arg(config, "intermediate_size", "ffn_dim", default=4 * hidden))
    vocab = int(_arg(config, "vocab_size", default=0))

    weights: dict[str, int] = {}
    lora_bytes, first, lora_mlp = 0, len(blocks), False
    float_sizes = []
    block_of = {id(b): i for i, b in enumerate(blocks)}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            lora_bytes += module.lora_a.nbytes + module.lora_b.nbytes
            lora_mlp = lora_mlp or name.split(".")[-1] in MLP_MODULES
        if id(module) in block_of and any(isinstance(m, LoRALinear) for _, m in module.named_modules()):
            first = min(first, block_of[id(module)])
        own = {k: v for k, v in module.items() if isinstance(v, mx.array)}
        if isinstance(module, LoRALinear) or not own:
            continue
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            kind = f"{module.bits}-bit (+ {own['scales'].dtype} scales)".replace("mlx.core.", "")
            float_sizes.append(own["scales"].dtype.size)
        else:
            kind = None
        for v in own.values():
            label = kind or str(v.dtype).replace("mlx.core.", "")
            weights[label] = weights.get(label, 0) + v.nbytes
            if kind is None and v.dtype in (mx.float32, mx.float16, mx.bfloat16):
                float_sizes.append(v.dtype.size)
    if first == len(blocks):
        first = 0
    parts = _find_parts(model)
    if gather is None:
        gather = parts.body is not None
    mlx_float32 = engine == "mlx" and dequantized_layers(model) > 0
    # A model already checked by `loss.model_parts` (the one about to train) says whether its rows may run in
    # stages; a lazily loaded one is not run, and counts on its structure (the check rarely fails).
    checked = model.__dict__.get("_mlxtune_parts")
    stages = engine == "mlx" and gather and (checked.staged if checked is not None else parts.prefixed is not None)
    # A quantized head the loss may slice is affine (`loss._sliceable`): the CPU de-quantizes it. The base classes,
    # since --quantize plans a model before `compute_dequantized` switches its layers.
    dequantized_head = (engine == "mlx" and on_cpu()
                        and isinstance(parts.projection, (nn.QuantizedLinear, nn.QuantizedEmbedding)))
    return ModelShape(blocks=len(blocks), hidden=hidden, intermediate=inter, heads=heads, vocab=vocab,
                      act_bytes=4 if mlx_float32 else max(float_sizes, default=4), weights=weights, lora_bytes=lora_bytes,
                      first_adapted=first, lora_mlp=lora_mlp, gather=gather, stages=stages,
                      head_vocab=head_slice(parts) if gather and engine == "mlx" else 0,
                      head_dequantized=dequantized_head, head_capped=bool(parts.cap))


def micro_batch_shapes(records, args: TrainingArgs, pack: bool, gather: bool, *, batch_size: int | None = None,
                       grad_accumulation: int | None = None, stages: bool = False) -> set[MicroBatch]:
    """The distinct micro-batch shapes of the run's batches (the same iterator `mlxtune.lora` draws from)."""
    size = batch_size or args.batch_size
    accum = grad_accumulation or args.grad_accumulation
    steps = min(max(args.iters, 1), LAZY_SCAN_LIMIT if is_lazy(records) else SCAN_LIMIT)
    shapes = set()
    if is_lazy(records) and len(records):
        # Reading thousands of batches would tokenize them all: the first few are read, and the longest
        # estimated record stands for the rest, as a full micro-batch of its length.
        longest = max(PAD_MULTIPLE, round_up(int(min(records.lengths.max(), args.max_seq_length)) - 1, PAD_MULTIPLE))
        shapes.add(MicroBatch(size, longest, size * longest, False))
    batches = iterate_batches(records, size * accum, max_seq_length=args.max_seq_length, seed=args.seed,
                              loop=True, shuffle=True, pack=pack, order=args.batch_order)
    for _, batch in zip(range(steps), batches):
        for part in micro_batches(batch, accum):
            shapes.add(_micro_batch(part, gather, stages))
    return shapes


def _micro_batch(batch, gather: bool, stages: bool) -> MicroBatch:
    """A batch's shape, whole and (with `stages`) in the stages the MLX loss would run it in. The stages cover
    every row and every column after the prefix, so the whole shape follows from them."""
    packed = batch.segments is not None
    if not (stages and gather and not packed):
        arrays = batch_arrays(batch, gather)
        rows, length = arrays[0].shape
        return MicroBatch(rows, length, arrays[3].shape[0] if gather else rows * length, packed)
    inputs, _, _, index, *rest = batch_arrays(batch, gather, share=True, stage=True)
    prefix = len(rest.pop()) if rest and rest[-1].ndim == 1 else 0  # [*later stages, prefix?]
    layout = tuple(a.shape for a in (inputs, *rest))
    return MicroBatch(inputs.shape[0], prefix + sum(columns for _, columns in layout), len(index), False, layout,
                      prefix)


def eval_shapes(records, args: TrainingArgs, gather: bool, batch_size: int | None = None, *,
                stages: bool = False) -> set[MicroBatch]:
    """The validation batches' shapes (unpacked, in order, --val-batches of them, --batch-size rows each)."""
    if not records:
        return set()
    shapes = set()
    size = batch_size or args.batch_size
    batches = iterate_batches(records, min(size, len(records)), max_seq_length=args.max_seq_length, seed=0,
                              loop=False, shuffle=False, pack=False)
    for i, batch in enumerate(batches):
        if args.val_batches != -1 and i >= args.val_batches:
            break
        shapes.add(_micro_batch(batch, gather, stages))
    return shapes


def staging(shape: ModelShape, args: TrainingArgs) -> bool:
    """Whether `args` let the MLX loss share a prefix and run rows in stages (validation always may then;
    training not under --grad-checkpoint nor with LoRA dropout: `MLXEngine.share`)."""
    return shape.stages and args.share_prefix


# ------------------------------------------------------------------------------------------------ the estimate


def _terms(s: ModelShape, b: MicroBatch, staged: bool = False, largest: bool = False) -> dict[str, float]:
    """The shapes of ACTIVATION's terms. In stages (the prefix once, then each stage's queries against every
    key up to its end) what a block keeps for the backward pass adds up over the stages, while the step's
    temporaries exist for one stage at a time: `largest` gives those, the largest stage's."""
    e = s.act_bytes
    tokens, scores = b.rows * b.length, b.rows * b.length ** 2  # positions, and query-key pairs of one head
    if staged and b.stages:
        each, end = [(b.prefix, b.prefix ** 2)], b.prefix
        for rows, columns in b.stages:
            end += columns
            each.append((rows * columns, rows * columns * end))
        pick = max if largest else sum
        tokens, scores = pick(t for t, _ in each), pick(q for _, q in each)
    return {"attention": scores * s.heads * e, "hidden": tokens * s.hidden * e,
            "mlp": tokens * s.intermediate * e, "head": b.targets * (s.head_vocab or s.vocab) * 4,
            "head_weights": s.head_vocab * s.hidden * 4 if s.head_dequantized else 0,
            "packed_mask": b.rows * b.length ** 2 if b.packed else 0}


def activation_bytes(s: ModelShape, b: MicroBatch, checkpoint: bool, staged: bool = False) -> int:
    """Activations and step temporaries of one micro-batch (see ACTIVATION and CHECKPOINTED), its rows run in
    stages when `staged`."""
    t, n = _terms(s, b, staged), s.grad_blocks
    one = _terms(s, b, staged, largest=True)
    mlp_lora = (t["hidden"] + t["mlp"]) if s.lora_mlp else 0.0
    if checkpoint:
        c = CHECKPOINTED
        # with frozen blocks in front, the head's gradient is still alive when the last block is recomputed
        frozen = t["head"] if s.first_adapted > 0 else 0.0
        total = (n * (c["n_hidden"] * t["hidden"] + c["n_attention"] * t["attention"])
                 + c["attention"] * t["attention"] + c["hidden"] * t["hidden"] + c["mlp"] * t["mlp"]
                 + c["head"] * t["head"] + c["head_frozen"] * frozen + c["lora_mlp"] * mlp_lora
                 + c["head_weights"] * t["head_weights"])
    else:
        c = ACTIVATION
        # the sliced head's exps, kept from its forward to its backward: exact bytes, not fitted
        kept = b.targets * s.vocab * 4 if s.head_vocab and head_kept(b.targets, s.vocab, checkpoint, s.head_capped) else 0
        total = (n * (c["n_attention"] * t["attention"] + c["n_hidden"] * t["hidden"] + c["n_mlp"] * t["mlp"]
                      + c["n_lora_mlp"] * mlp_lora)
                 + c["attention"] * one["attention"] + c["hidden"] * one["hidden"] + c["mlp"] * one["mlp"]
                 + c["head"] * t["head"] + c["packed_mask"] * t["packed_mask"] + kept
                 + c["head_weights"] * t["head_weights"])
    if s.act_bytes == 2:
        total *= HALF_PRECISION[checkpoint]
    return int(total)


def evaluation_bytes(s: ModelShape, b: MicroBatch, staged: bool = False) -> int:
    t = _terms(s, b, staged)
    return int(sum(EVALUATION[k] * t[k] for k in EVALUATION))


def estimate(shape: ModelShape, train_shapes: set[MicroBatch], args: TrainingArgs, *,
             valid_shapes: set[MicroBatch] = frozenset(), batch_size: int | None = None,
             grad_accumulation: int | None = None, grad_checkpoint: bool | None = None) -> Estimate:
    """The peak of a run with `args` (or with the batch settings given here) over the micro-batch shapes."""
    settings = {"batch_size": batch_size or args.batch_size, "grad_accumulation": grad_accumulation or args.grad_accumulation,
                "grad_checkpoint": args.grad_checkpoint if grad_checkpoint is None else grad_checkpoint}
    lora = shape.lora_bytes
    slots = {"adamw": 2, "adam": 2, "sgd": 1}[args.optimizer]
    grads = lora * (2 if settings["grad_accumulation"] > 1 else 1)  # the accumulator is a second tree
    stages = staging(shape, args)
    trained_in_stages = stages and not args.dropout  # unless checkpointing (`MLXEngine.share`)
    largest, act = None, 0
    for b in train_shapes:
        size = activation_bytes(shape, b, settings["grad_checkpoint"],
                                trained_in_stages and not settings["grad_checkpoint"])
        if size > act:
            largest, act = b, size
    for b in valid_shapes:  # validation runs between steps: its forward pass is a peak of its own
        act = max(act, evaluation_bytes(shape, b, stages))
    return Estimate(weights=shape.weight_bytes, lora=lora, grads=grads, optimizer=lora * slots, activations=act,
                    batch=largest, settings=settings, stages=trained_in_stages)


def candidates(args: TrainingArgs) -> list[tuple[int, int, bool]]:
    """Batch settings with the same effective batch, from the fastest to the leanest."""
    total = args.batch_size * args.grad_accumulation
    out = []
    for size in sorted((d for d in range(1, total + 1) if total % d == 0), reverse=True):
        if size > args.batch_size:
            continue
        for ckpt in ((False, True) if not args.grad_checkpoint else (True,)):
            out.append((size, total // size, ckpt))
    return out


def first_fit(shape: ModelShape, splits, args: TrainingArgs, pack: bool, budget: int) -> Estimate | None:
    """The first of `candidates` whose estimate fits `budget` (None when even the leanest does not).
    Validation batches have --batch-size rows too, so they shrink with each candidate."""
    seen: dict[tuple[int, int], tuple[set[MicroBatch], set[MicroBatch]]] = {}
    stages = staging(shape, args)
    for size, accum, ckpt in candidates(args):
        if (size, accum) not in seen:
            seen[(size, accum)] = (micro_batch_shapes(splits.train, args, pack, shape.gather, batch_size=size,
                                                      grad_accumulation=accum, stages=stages),
                                   eval_shapes(splits.valid, args, shape.gather, size, stages=stages)
                                   if args.iters > 0 else set())
        train, valid = seen[(size, accum)]
        found = estimate(shape, train, args, valid_shapes=valid, batch_size=size, grad_accumulation=accum,
                         grad_checkpoint=ckpt)
        if found.peak <= budget:
            return found
    return None


# ------------------------------------------------------------------------------------------------ the budget


def parse_size(text: str | int | float) -> int:
    """'12GB', '12G', '500MB', '1.5 GiB' or a number of GB -> bytes."""
    if isinstance(text, (int, float)):
        return int(float(text) * GB)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"--memory-limit {text}: expected a size like 12GB, 12G or 500MB")
    number, unit, binary = float(m.group(1)), m.group(2).lower(), bool(m.group(3))
    scale = {"": GB, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[unit] if not binary else \
        {"k": 2 ** 10, "m": 2 ** 20, "g": 2 ** 30, "t": 2 ** 40}.get(unit, GB)
    return int(number * scale)


def available_ram() -> int:
    """Bytes the OS can hand out now without swapping (MemAvailable on Linux)."""
    available = proc_field_bytes("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def memory_budget(backend: str = "mlx", device: str = "cpu", limit: str | int | float | None = None) -> tuple[int, str]:
    """(bytes, where the number comes from): --memory-limit, Metal's recommended working set, the CUDA device's
    memory (torch), or the RAM available now plus what this process's MLX arrays already hold."""
    if limit is not None:
        return parse_size(limit), "--memory-limit"
    if backend == "torch" and device.startswith("cuda"):
        import torch  # optional and heavy: only for the torch backend on CUDA

        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory), f"{device} memory"
    if backend == "mlx" and mx.metal.is_available():
        info = mx.device_info()
        return int(info["max_recommended_working_set_size"]), "Metal recommended working set"
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    if backend == "mlx" and "memory_size" in info and device == "gpu":
        return int(info["memory_size"]), "GPU memory"
    return available_ram() + mx.get_active_memory(), "available RAM"


def set_wired_limit() -> None:
    """On Metal, wire the recommended working set as mlx-lm's trainer does (no-op elsewhere)."""
    if mx.metal.is_available():
        from mlx_lm.utils import maybe_set_recommended_wired_limit

        maybe_set_recommended_wired_limit()


# ------------------------------------------------------------------------------------------------ entry points


def plan_for(shape: ModelShape, splits, args: TrainingArgs, *, backend: str = "mlx", device: str = "cpu",
             pack: bool | None = None, baseline: int = 0) -> Plan:
    """The plan of `args` for a model of `shape` and its data splits; `baseline`: bytes held outside the
    tensors (a CPU torch run's peak is the process's RSS, which starts with the interpreter and libraries)."""
    pack = args.pack if pack is None else pack
    stages = staging(shape, args)
    train_shapes = micro_batch_shapes(splits.train, args, pack, shape.gather, stages=stages)
    valid = eval_shapes(splits.valid, args, shape.gather, stages=stages) if args.iters > 0 else set()
    found = estimate(shape, train_shapes, args, valid_shapes=valid)
    found.weights += baseline
    budget, source = memory_budget(backend, device, args.memory_limit)
    result = Plan(found, budget, source, shape)
    if baseline:
        result.notes.append(f"(weights include {baseline / GB:.2f} GB of this process's own memory: the torch CPU "
                            "report counts the process's peak RSS)")
    if backend == "torch":
        result.notes.append("note: torch backend: the activation terms were measured on MLX; torch's autograd keeps "
                            "similar tensors, so treat this estimate as a rougher guess")
    if args.grad_checkpoint and found.stages:  # (the torch engine never stages)
        # Checkpointed blocks run every row over the whole batch width (`MLXEngine.share`); on rows of mixed
        # lengths, or after a long shared prompt, that can cost more than the activations it drops.
        plain = estimate(shape, train_shapes, args, valid_shapes=valid, grad_checkpoint=False)
        if plain.peak < found.peak:
            result.warnings.append(
                f"note: --grad-checkpoint raises this run's peak by {_size(found.peak - plain.peak)} ({_size(plain.peak)} "
                "without it): checkpointed blocks cannot share the batch's common prompt nor run its rows in stages "
                "of their own lengths, and these batches save more that way; drop --grad-checkpoint")
    if not result.fits:
        suggestion = first_fit(shape, splits, args, pack, int(MARGIN * budget) - baseline)
        if suggestion is not None:
            suggestion.weights += baseline
        result.suggestion = suggestion
    return result


def check_memory(model, splits, args: TrainingArgs, *, backend: str = "mlx", device: str = "cpu",
                 pack: bool | None = None, say: Callable[[str], None] = print) -> TrainingArgs:
    """What `mlxtune lora` does before training: one line, then refuse, adapt (--auto-fit) or go on.

    `model` is the model about to train, LoRA applied (MLX, or a transformers model on the torch backend).
    Returns the settings to train with: a copy with other batch settings when --auto-fit chose them."""
    baseline = 0
    if backend == "torch":  # shapes from the MLX twin (lazy: no weight is read), sizes from torch's tensors
        shape = model_shape(_lazy_lora_model(args, False), engine="torch")
        shape.weights = {"torch tensors": _torch_weight_bytes(model)}
        if device == "cpu":
            baseline = max(0, _process_baseline() - shape.weight_bytes)
    else:
        set_wired_limit()
        shape = model_shape(model)
    result = plan_for(shape, splits, args, backend=backend, device=device, pack=pack, baseline=baseline)
    say(result.short_line())
    for line in result.warnings:
        say(line)
    if result.fits:
        return args
    if args.auto_fit and result.suggestion is not None:
        chosen = result.suggestion.settings
        say(f"--auto-fit: training with {flags_of(chosen)} ({_size(result.suggestion.peak)} estimated, "
            f"effective batch {chosen['batch_size'] * chosen['grad_accumulation']})")
        return dataclasses.replace(args, **chosen)
    if args.force:
        say(f"warning: the estimate is {_size(result.estimate.peak - result.budget)} over the budget; "
            "starting anyway (--force)")
        return args
    raise ConfigError(f"this run needs ~{_size(result.estimate.peak)} but the budget is {_size(result.budget)} "
                      f"({result.budget_source}). {result.advice()}"
                      f"{'; pass --auto-fit to use them' if result.suggestion else ''}, or --force to start anyway")


def resolve_settings(model, data, config, kwargs: dict) -> tuple[TrainingArgs, Any, bool]:
    """(settings, data, whether --lora-layers was given) exactly as `mlxtune.lora` merges them (the bundled demo
    when neither model nor data is given)."""
    explicit = normalize_keys({k: v for k, v in kwargs.items() if v is not None}, "argument")
    file_values = read_config_file(config) if config is not None else {}
    filled = fill_in(model if model is not None else file_values.get("model"),
                     data if data is not None else file_values.get("data"), verb="lora")
    base = None
    if filled.training:
        base = read_config_file(DEFAULT_LORA_CONFIG) if DEFAULT_LORA_CONFIG.exists() else {}
        base.pop("model", None)
        base.pop("data", None)
    explicit.pop("model", None)
    explicit.pop("data", None)
    args = training_args(config, base=base, **explicit, model=str(filled.model),
                         data=filled.data if isinstance(filled.data, (str, os.PathLike)) else None)
    return args, filled.data, "lora_layers" in explicit or "lora_layers" in file_values


def plan(model: Any = None, data: Any = None, *, config: str | os.PathLike | None = None, verbose: bool = True,
         **kwargs) -> Plan:
    """Estimate the peak memory of `mlxtune.lora(model, data, **kwargs)` without training; returns a Plan.

    Takes the same arguments as `mlxtune.lora` (`memory_limit="12GB"` sets the budget). The model is loaded
    lazily (its weights are never read), LoRA is applied as training would, and the data is tokenized and
    batched exactly as training will batch it. With `verbose` the breakdown is printed; its last line is
    `Estimated peak memory: X.XX GB (budget Y.YY GB): fits` (or `does not fit`).
    """
    args, data_arg, layers_given = resolve_settings(model, data, config, kwargs)
    backend = select_backend(args.backend)
    loaded = load_model(args.model, lazy=True)
    splits = load_dataset(data_arg, loaded.tokenizer, valid_split=args.valid_split, test_split=args.test_split,
                          seed=args.seed, max_seq_length=args.max_seq_length, train_on_inputs=args.train_on_inputs,
                          chat_template=args.chat_template, prompt_key=args.prompt_key,
                          completion_key=args.completion_key, text_key=args.text_key,
                          messages_key=args.messages_key, cache=True)
    shape = model_shape(_lazy_lora_model(args, layers_given, loaded.model), engine=backend.name)
    baseline = _process_baseline() if backend.name == "torch" and backend.device == "cpu" else 0
    result = plan_for(shape, splits, args, backend=backend.name, device=backend.device, baseline=baseline)
    if verbose:
        print(result.report(), flush=True)
    return result


def _lazy_lora_model(args: TrainingArgs, layers_given: bool, model: nn.Module | None = None) -> nn.Module:
    """The MLX model of `args.model` with LoRA applied as training would, weights never read (lazy)."""
    if model is None:
        model = load_model(args.model, lazy=True).model
    if args.quantize and not any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
        nn.quantize(model, group_size=64, bits=4,  # what `mlxtune lora --quantize` does, still lazy
                    class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0)
    apply_lora(model, lora_layers=args.lora_layers, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
               target_modules=args.target_modules, explicit_layers=layers_given, seed=args.seed)
    return model


def _process_baseline() -> int:
    """This process's resident memory (what a CPU torch run's peak RSS starts from)."""
    return proc_field_bytes("/proc/self/status", "VmRSS") or 0


def _torch_weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())
