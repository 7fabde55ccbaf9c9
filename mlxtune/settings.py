"""The settings of a training run: `TrainingArgs`, read from defaults, a YAML file and keyword arguments / flags.

One dataclass holds every knob; YAML keys, Python keyword arguments and CLI flags (`-` -> `_`) are its field
names, so the three cannot drift apart. The one thing to know: mlx-lm's lora YAML layout and key names are
accepted too (`ALIASES`, `lora_parameters`), so a user's existing config runs as it is.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

OPTIMIZERS = ("adamw", "adam", "sgd")
BATCH_ORDERS = ("length", "random")  # how mlxtune.data forms batches (`_epoch_plan`)
BACKENDS = ("auto", "mlx", "torch")
SCHEDULES = ("constant", "cosine", "linear")
ALIASES = {"num_layers": "lora_layers", "adapter_path": "adapter_file", "steps_per_save": "save_every",
           "grad_accumulation_steps": "grad_accumulation", "lr": "learning_rate"}


@dataclass
class TrainingArgs:
    """Every knob of a LoRA run. YAML keys, Python keyword arguments and CLI flags (`-` -> `_`) are these names."""

    model: str | None = field(default=None, metadata={"help": "Base model: an MLX/HF directory, a hub id or a GGUF file."})
    data: str | None = field(default=None, metadata={
        "help": "Dataset: a directory with train/valid/test.jsonl, or one .jsonl file."})
    backend: str = field(default="auto", metadata={
        "help": "auto, mlx or torch (pip install \"mlxtune[torch]\"; CUDA machines). auto: MLX on a GPU, else torch "
                "when it sees CUDA, else MLX on the CPU (`mlxtune doctor` says which)."})
    quantize: bool = field(default=False, metadata={
        "help": "QLoRA on a float base: MLX quantizes it to 4 bits in memory; torch loads it in NF4 with "
                "bitsandbytes on CUDA (on the CPU torch trains the float base and says so)."})
    fsdp: bool = field(default=False, metadata={
        "help": "With --backend torch under torchrun: shard the transformer blocks' frozen weights across the ranks "
                "(FSDP2 fully_shard), for a model larger than one GPU; the LoRA weights stay whole on every rank."})
    adapter_file: str = field(default="adapters/adapters.npz", metadata={
        "help": "Where the adapter goes; checkpoints, metrics.jsonl and loss.png are written beside it."})
    lora_layers: int = field(default=16, metadata={"help": "Adapt the last N transformer blocks (-1 = all). Alias --num-layers."})
    rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / rank."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    target_modules: str = field(default="attention", metadata={
        "help": "attention (q,k,v,o projections), all-linear (adds the MLP), or a comma list like q_proj,v_proj."})
    batch_size: int = field(default=4, metadata={"help": "Examples (or packed rows) per micro-batch."})
    iters: int = field(default=1000, metadata={"help": "Optimizer steps to train for."})
    learning_rate: float = field(default=1e-4, metadata={
        "help": "Peak learning rate (1e-4 suits LoRA; try 2e-4 for small ranks)."})
    lr_schedule: str = field(default="constant", metadata={
        "help": "constant, cosine or linear decay (to --lr-end) after warmup."})
    lr_end: float = field(default=0.0, metadata={"help": "Learning rate at the end of a cosine or linear decay."})
    lr_decay_steps: int = field(default=0, metadata={
        "help": "Steps the decay takes after warmup (0 = until --iters); the rate then stays at --lr-end."})
    warmup: int = field(default=0, metadata={"help": "Steps of linear warmup from 0 to the learning rate."})
    optimizer: str = field(default="adamw", metadata={"help": "adamw, adam or sgd."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay (adamw, sgd)."})
    bias_correction: bool = field(default=False, metadata={
        "help": "Adam/AdamW with bias correction, as in PyTorch and Hugging Face trainers. Off: MLX's and mlx-lm's "
                "Adam, whose steps are ~3x larger over the first few hundred updates."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the global gradient norm to this (0 = no clipping)."})
    grad_accumulation: int = field(default=1, metadata={
        "help": "Micro-batches per optimizer step; equals a batch of batch-size x N."})
    grad_checkpoint: bool = field(default=False, metadata={
        "help": "Recompute block activations in the backward pass: less memory, ~30% slower."})
    share_prefix: bool = field(default=True, metadata={
        "help": "Run the leading tokens that every row of a batch shares (a chat template's default system prompt) "
                "through the model once per batch: the same loss and gradients, less work. MLX only; off under "
                "--grad-checkpoint and LoRA dropout."})
    memory_limit: str | None = field(default=None, metadata={
        "help": "Memory budget for the memory plan, like 12GB or 500MB (default: Metal's recommended working set, "
                "the CUDA device's memory with --backend torch, else the RAM available). See `mlxtune plan`."})
    auto_fit: bool = field(default=False, metadata={
        "help": "When the memory plan does not fit the budget, choose --batch-size, --grad-accumulation and "
                "--grad-checkpoint that fit, keeping the effective batch size."})
    max_seq_length: int = field(default=2048, metadata={"help": "Longer examples are truncated to this many tokens."})
    pack: bool = field(default=False, metadata={
        "help": "Pack several examples into each row of up to --max-seq-length tokens (block-diagonal "
                "attention, same loss as unpacked); --batch-size then counts rows."})
    batch_order: str = field(default="random", metadata={
        "help": "random: each batch drawn at random (varied batches: where length goes with content and batches "
                "are small, it reaches a lower validation loss in the same steps, see docs/training.md; its rows "
                "run in stages, so most of its padding is not computed); "
                "length: each batch holds examples of one padded length (a multiple of 8), drawn at random among "
                "them (least padding, 15-20% faster on the CPU; for large batches of very uneven lengths). "
                "Batches come in shuffled order either way; --pack fills rows from a random order."})
    train_on_inputs: bool = field(default=False, metadata={
        "help": "Also learn the prompt/user tokens, not only the completions."})
    valid_split: float = field(default=0.1, metadata={
        "help": "Fraction held out for validation from a single-file dataset, or from train.jsonl when a data "
                "directory has no valid.jsonl."})
    test_split: float = field(default=0.0, metadata={"help": "Fraction of a single-file dataset held out for --test."})
    seed: int = field(default=0, metadata={"help": "Seed for LoRA init, data order and dropout."})
    steps_per_report: int = field(default=10, metadata={"help": "Steps between training-loss reports."})
    steps_per_eval: int = field(default=200, metadata={"help": "Steps between validation-loss reports (0 = only at the end)."})
    val_batches: int = field(default=25, metadata={"help": "Validation batches per evaluation (-1 = the whole set)."})
    save_every: int = field(default=100, metadata={"help": "Steps between checkpoints (0000100_adapters.npz)."})
    resume: bool = field(default=False, metadata={"help": "Continue from the newest checkpoint beside --adapter-file."})
    force: bool = field(default=False, metadata={
        "help": "Replace an existing adapter (and its checkpoints) in --adapter-file's folder; also start when the "
                "memory plan says the run does not fit."})
    test: bool = field(default=False, metadata={
        "help": "Report test loss and perplexity after training (or, with an existing --adapter-file and no --iters, "
                "instead of training)."})
    test_batches: int = field(default=-1, metadata={"help": "Test batches for --test (-1 = the whole set)."})
    plot: bool = field(default=True, metadata={"help": "Write loss.png beside the adapter."})
    chat_template: str | None = field(default=None, metadata={
        "help": "A Jinja chat template file to use instead of the tokenizer's, or chatml (without any, prompt/completion "
                "data trains as prompt + completion + EOS and chat data is refused)."})
    prompt_key: str | None = field(default=None, metadata={
        "help": "Field holding the prompt, when your records name it differently."})
    completion_key: str | None = field(default=None, metadata={"help": "Field holding the completion/answer."})
    text_key: str | None = field(default=None, metadata={"help": "Field holding plain text records."})
    messages_key: str | None = field(default=None, metadata={"help": "Field holding a chat's message list."})
    report_to: str = field(default="none", metadata={
        "help": "none, or wandb to also log the reports to Weights & Biases (needs `pip install wandb`)."})

    def validate(self) -> TrainingArgs:
        def need(ok: bool, flag: str, what: str, value):
            if not ok:
                raise ConfigError(f"--{flag.replace('_', '-')} {what}, got {value}")

        need(self.rank > 0, "rank", "must be a positive integer", self.rank)
        need(self.batch_size > 0, "batch_size", "must be a positive integer", self.batch_size)
        need(self.iters >= 0, "iters", "must be 0 or more", self.iters)
        need(self.learning_rate > 0, "learning_rate", "must be positive", self.learning_rate)
        need(self.lr_schedule in SCHEDULES, "lr_schedule", f"must be one of {', '.join(SCHEDULES)}", self.lr_schedule)
        need(self.batch_order in BATCH_ORDERS, "batch_order", f"must be one of {', '.join(BATCH_ORDERS)}",
             self.batch_order)
        need(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {', '.join(OPTIMIZERS)}", self.optimizer)
        need(self.warmup >= 0, "warmup", "must be 0 or more", self.warmup)
        need(self.grad_accumulation >= 1, "grad_accumulation", "must be at least 1", self.grad_accumulation)
        need(self.max_grad_norm >= 0, "max_grad_norm", "must be 0 (off) or positive", self.max_grad_norm)
        need(self.weight_decay >= 0, "weight_decay", "must be 0 or more", self.weight_decay)
        if self.optimizer == "adam" and self.weight_decay > 0:
            raise ConfigError(f"--weight-decay {self.weight_decay:g} has no effect with --optimizer adam: use --optimizer "
                              "adamw (decoupled weight decay) or drop --weight-decay")
        need(0 <= self.lr_end <= self.learning_rate, "lr_end", "must be between 0 and --learning-rate", self.lr_end)
        need(self.lr_decay_steps >= 0, "lr_decay_steps", "must be 0 (until --iters) or more", self.lr_decay_steps)
        need(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)", self.dropout)
        need(self.max_seq_length >= 2, "max_seq_length", "must be at least 2", self.max_seq_length)
        need(self.steps_per_report > 0, "steps_per_report", "must be positive", self.steps_per_report)
        need(self.steps_per_eval >= 0, "steps_per_eval", "must be 0 or more", self.steps_per_eval)
        need(self.save_every >= 0, "save_every", "must be 0 (only the final adapter) or more", self.save_every)
        need(self.backend in BACKENDS, "backend", f"must be one of {', '.join(BACKENDS)}", self.backend)
        need(self.report_to in ("none", "wandb"), "report_to", "must be none or wandb", self.report_to)
        need(self.lora_layers == -1 or self.lora_layers > 0, "lora_layers", "must be a positive number of blocks or -1 for all",
             self.lora_layers)
        suffix = Path(self.adapter_file).suffix
        need(suffix in (".npz", ".safetensors"), "adapter_file", "must end in .npz or .safetensors", self.adapter_file)
        return self


def _field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(TrainingArgs)}


def normalize_keys(values: dict, source: str) -> dict:
    out = {}
    names = _field_names()
    for key, value in values.items():
        k = ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
        if k not in names:
            close = [n for n in names if n.split("_")[0] == k.split("_")[0]]
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{source}: unknown setting {key!r}{hint}; see `mlxtune lora --help` for the valid names")
        out[k] = value
    return out


def read_config_file(path: str | os.PathLike) -> dict:
    """A YAML file of TrainingArgs names -> values (mlx-lm's lora config keys are accepted too)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist (check --config)")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f"{path} line {line + 1}" if line is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of setting: value, got a {type(values).__name__}")
    if "lora_parameters" in values:  # mlx-lm layout: rank/scale/dropout/keys nested
        p = values.pop("lora_parameters") or {}
        if not isinstance(p, dict):
            raise ConfigError(f"{path}: lora_parameters must be a mapping (rank, scale, dropout, keys), got {p!r}")
        values.setdefault("rank", p.get("rank", 8))
        if "scale" in p:
            values.setdefault("alpha", float(p["scale"]) * values["rank"])
        if "dropout" in p:
            values.setdefault("dropout", p["dropout"])
        if p.get("keys"):
            values.setdefault("target_modules", ",".join(k.split(".")[-1] for k in p["keys"]))
    _from_mlx_lm(values, path)
    return normalize_keys(values, str(path))


# mlx-lm schedule names -> ours
MLX_LM_SCHEDULES = {"cosine_decay": "cosine", "linear_schedule": "linear"}


def _from_mlx_lm(values: dict, path: Path) -> None:
    """Translate mlx-lm's lora YAML keys that have an mlxtune meaning; refuse, in one line, what has none."""
    kind = values.pop("fine_tune_type", "lora")
    if kind != "lora":
        raise ConfigError(f"{path}: fine_tune_type {kind!r} is not supported: mlxtune trains LoRA adapters only "
                          "(set it to lora or remove the key)")
    if values.pop("train", True) is False:
        raise ConfigError(f"{path}: train: false is not supported: to only test an adapter, run mlxtune lora --test "
                          "with an existing --adapter-file and no --iters")
    if "resume_adapter_file" in values:
        raise ConfigError(f"{path}: resume_adapter_file is mlx-lm's; in mlxtune set adapter_file to that adapter "
                          "and pass --resume (it continues from the adapter's newest checkpoint)")
    if "mask_prompt" in values:
        values.setdefault("train_on_inputs", not values.pop("mask_prompt"))
    schedule = values.get("lr_schedule")
    if isinstance(schedule, dict):
        _translate_schedule(values, schedule, path)
    options = values.pop("optimizer_config", None)
    if options:
        name = str(values.get("optimizer", "adam"))
        mine = dict((options or {}).get(name) or {})
        if "weight_decay" in mine:
            values.setdefault("weight_decay", mine.pop("weight_decay"))
        others = sorted(set(mine) | (set(options) - {name}))
        if others:
            raise ConfigError(f"{path}: optimizer_config {others[0]!r} is not supported (mlxtune takes weight_decay "
                              f"for {name}; betas and eps keep their defaults): remove it")


def _translate_schedule(values: dict, schedule: dict, path: Path) -> None:
    name, arguments = schedule.get("name"), list(schedule.get("arguments") or [])
    if name not in MLX_LM_SCHEDULES:
        raise ConfigError(f"{path}: lr_schedule name {name!r} is not supported: use cosine_decay or linear_schedule, "
                          "or mlxtune's lr_schedule: constant | cosine | linear")
    if float(schedule.get("warmup_init", 0.0) or 0.0) != 0.0:
        raise ConfigError(f"{path}: lr_schedule warmup_init is not supported: mlxtune warms up linearly from "
                          "learning_rate / warmup (remove warmup_init)")
    if name == "cosine_decay":  # cosine_decay(init, decay_steps, end=0)
        init, steps, end = (arguments + [None, None, 0.0])[:3]
    else:  # linear_schedule(init, end, steps)
        init, end, steps = (arguments + [None, 0.0, None])[:3]
    if init is None or steps is None:
        raise ConfigError(f"{path}: lr_schedule {name} needs its arguments (initial rate and steps)")
    values["lr_schedule"] = MLX_LM_SCHEDULES[name]
    values.setdefault("learning_rate", init)
    values.setdefault("lr_decay_steps", steps)
    values.setdefault("lr_end", end)
    values.setdefault("warmup", schedule.get("warmup", 0))


def training_args(config: str | os.PathLike | None = None, base: dict | None = None, **overrides) -> TrainingArgs:
    """Merge settings: dataclass defaults < `base` < the YAML `config` file < `overrides` (e.g. CLI flags)."""
    values: dict[str, Any] = {}
    if base:
        values.update(normalize_keys(base, "settings"))
    from_file: set[str] = set()
    if config is not None:
        values.update(read_config_file(config))
        from_file = set(values)
    given = normalize_keys({k: v for k, v in overrides.items() if v is not None}, "argument")
    from_file -= set(given)
    values.update(given)
    fields = {f.name: f for f in dataclasses.fields(TrainingArgs)}
    for k, v in list(values.items()):  # YAML gives strings for "1e-4" and lists for target modules
        kind = type(fields[k].default)
        try:
            if kind is bool and not isinstance(v, bool):
                v = str(v).lower() in ("1", "true", "yes", "on")
            elif kind in (int, float) and v is not None:
                v = kind(float(v)) if kind is int and float(v).is_integer() else kind(v)
            elif k == "target_modules" and isinstance(v, (list, tuple)):
                v = ",".join(v)
        except (TypeError, ValueError):
            names = {int: "a whole number", float: "a number", bool: "true or false"}
            where = f"{config}: {k}" if k in from_file else k
            raise ConfigError(f"{where}: expected {names.get(kind, f'a {kind.__name__}')}, got {v!r}") from None
        values[k] = v
    return TrainingArgs(**values).validate()
