"""LoRA / QLoRA fine-tuning: `mlxtune.lora(...)`, the function behind the `mlxtune lora` verb.

Read it top to bottom: settings (`mlxtune.settings`) -> backend (`mlxtune.backends`) -> model and adapter
layers -> data (`mlxtune.data`) -> the engine (`mlxtune.mlx_engine`, or `mlxtune.torch_engine` with
`--backend torch`) -> the shared loop (`mlxtune.loop`: reports, validation, checkpoints, resume). The one
thing to know: this function only assembles those pieces; each one is a module of its own, so the torch
engine plugs in with the same data, loss, reports, checkpoints and adapter files, not a second loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .adapters import AdapterConfig, load_adapter
from .backends import select_backend, torch_module
from .checkpoints import settings_fingerprint
from .data import is_lazy, iterate_batches, load_dataset, padding_fraction, records_fingerprint
from .defaults import DEFAULT_LORA_CONFIG, fill_in
from .dequantized import compute_dequantized, on_cpu
from .distributed import World, check_same_run, torchrun_size
from .errors import ConfigError, DataError
from .files import FolderLock
from .layers import apply_lora, count_parameters, remove_lora
from .loop import TrainResult, train
from .loss import evaluate_loss, model_parts
from .memory_plan import check_memory
from .mlx_engine import MLXEngine, make_optimizer, mlx_world
from .models import load_model
from .settings import TrainingArgs, normalize_keys, read_config_file, training_args
from .templates import read_template_option, template_for


def _fmt_count(n: int) -> str:
    m = n / 1e6
    return f"{m:.0f}M" if m >= 100 else f"{m:.1f}M" if m >= 1 else f"{m:.3f}M"


_HELD: list[contextlib.ExitStack] = []  # the locks of the lora() calls running now, innermost last


def _releases_locks(fn):
    """Whatever `fn` locks (`_HELD[-1].enter_context(...)`) is released when it returns or raises."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            _HELD.append(stack)
            try:
                return fn(*args, **kwargs)
            finally:
                _HELD.pop()

    return wrapper


@_releases_locks
def lora(model: Any = None, data: Any = None, *, tokenizer: Any = None, config: str | os.PathLike | None = None,
         callbacks: Iterable[Callable] = (), verbose: bool = True, resume_command: str | None = None,
         **kwargs) -> TrainResult:
    """Fine-tune `model` on `data` with LoRA (QLoRA when the model is quantized); returns a TrainResult.

    `model` is a path or hub id, or an already loaded mlx-lm model (then pass `tokenizer` too; it is
    trained in place and carries the adapter afterwards, ready for `mlxtune.generate`). Keyword
    arguments are TrainingArgs names (`iters=200, batch_size=8, lora_layers=8, ...`); `config` is a YAML
    file of the same names, which the keywords override. With neither model nor data, the bundled demo
    runs. Each callback gets every report dict (train and val) and may return True to stop training.
    Ctrl-C (a notebook's stop button) stops after the current step, saves a checkpoint and returns the
    partial result with `interrupted=True` and `resume_call`, the call that continues it (`resume_command`
    replaces it in what is printed: the CLI passes its own command line); a second Ctrl-C stops at once.
    Training a loaded model again replaces the LoRA layers the previous run left in it.
    """
    # Training seeds MLX's global generator (dropout noise is a function of seed and step). MLX offers no way to
    # put a key back, so one number is drawn from the caller's stream first and the stream is re-seeded with it
    # afterwards: what the caller draws next depends on the caller's seed, never on training's.
    follow = int(mx.random.randint(0, 2**31 - 1, shape=()).item())
    try:
        result = _lora(model, data, tokenizer=tokenizer, config=config, callbacks=callbacks, verbose=verbose, **kwargs)
    finally:
        mx.random.seed(follow)
        # What the run held (compiled step, optimizer state, a model loaded here) goes now, not at some later
        # collection: the next run in the same process (a notebook kernel) starts from the same memory.
        gc.collect()
        mx.clear_cache()
    if result.interrupted:
        result.resume_call = _python_call(model, data, config, kwargs)
        if verbose and result.checkpoint is not None:  # rank 0 (the others save nothing)
            print(f"Resume with: {resume_command or result.resume_call}", flush=True)
    return result


def _python_call(model, data, config, kwargs: dict) -> str:
    """The `mlxtune.lora(...)` call that resumes this one (a loaded model and its tokenizer are named
    `model` and `tokenizer`: the caller's own variables)."""
    def plain(v):  # paths as strings, so that the call reads as typed
        return str(v) if isinstance(v, os.PathLike) else [plain(x) for x in v] if isinstance(v, (list, tuple)) else v

    loaded = isinstance(model, nn.Module)
    args = ["model" if loaded else repr(plain(model))] if model is not None else []
    if data is not None:
        args.append(repr(plain(data)) if args else f"data={plain(data)!r}")
    if loaded:
        args.append("tokenizer=tokenizer")
    if config is not None:
        args.append(f"config={plain(config)!r}")
    args += [f"{k}={plain(v)!r}" for k, v in kwargs.items() if v is not None and k not in ("resume", "force")]
    return f"mlxtune.lora({', '.join(args + ['resume=True'])})"


def _lora(model, data, *, tokenizer, config, callbacks, verbose, **kwargs) -> TrainResult:
    preloaded = isinstance(model, nn.Module)
    explicit = normalize_keys({k: v for k, v in kwargs.items() if v is not None}, "argument")
    file_values = read_config_file(config) if config is not None else {}
    if model is None:
        model = file_values.get("model")
    if data is None:
        data = file_values.get("data")
    filled = fill_in(model, data, verb="lora")
    base = None
    if filled.training:
        base = read_config_file(DEFAULT_LORA_CONFIG) if DEFAULT_LORA_CONFIG.exists() else {}
        base.pop("model", None)
        base.pop("data", None)
    data_arg = filled.data
    args = training_args(config, base=base, **explicit, **({} if preloaded else {"model": str(filled.model)}),
                         data=data_arg if isinstance(data_arg, (str, os.PathLike)) else None)
    lora_layers_explicit = "lora_layers" in explicit or "lora_layers" in file_values
    if preloaded and args.backend == "torch":
        raise ConfigError("a loaded MLX model trains on the mlx backend: pass the model's path for --backend torch")
    backend = select_backend("mlx" if preloaded else args.backend)
    world = _world(backend, args)  # several ranks under mlx.launch or torchrun: only rank 0 speaks and writes
    backend = dataclasses.replace(backend, device=getattr(world, "device", backend.device))  # torchrun: cuda:LOCAL_RANK
    say = (lambda text: print(text, flush=True)) if verbose and world.main else (lambda text: None)
    if filled.note:
        say(filled.note)
    say(backend.line())
    torch_models = torch_module("torch_models") if backend.name == "torch" else None
    if torch_models is not None and not world.main:  # transformers' loading bar: rank 0's is enough
        torch_models.transformers.utils.logging.disable_progress_bar()
    fsdp = args.fsdp and world.size > 1
    if args.fsdp and not fsdp:
        say("note: --fsdp: a single process has nothing to shard (start the ranks with torchrun); training without it")

    adapter_file = Path(args.adapter_file)
    if world.main:  # one run per adapter folder: a second one refuses instead of mixing checkpoints
        _HELD[-1].enter_context(FolderLock(adapter_file.parent, "mlxtune lora run", "--adapter-file"))
    test_only = args.test and "iters" not in explicit and adapter_file.exists() and not args.resume
    if not test_only and adapter_file.exists() and not args.resume and not args.force:
        raise ConfigError(f"{adapter_file} already exists: pass --resume to continue it, --force to replace it, "
                          "or choose another --adapter-file")

    if preloaded:
        if tokenizer is None:
            raise ConfigError("a loaded model needs its tokenizer: call mlxtune.lora(model, data, tokenizer=tokenizer)")
        base_model = getattr(model, "_mlxtune_base", None)
        if not test_only and remove_lora(model):
            say("note: the model carries the LoRA layers of an earlier run; this run replaces them with new ones "
                "(their adapter file keeps the old weights)")
    elif torch_models is not None:
        # --fsdp on CUDA: load on the CPU, and sharding moves each rank's share of the blocks to its GPU
        stage = fsdp and backend.device.startswith("cuda")
        loaded = torch_models.load_torch_model(args.model, device="cpu" if stage else backend.device, quantize=args.quantize,
                                               say=say, dtype=torch_models.torch.bfloat16 if stage else None)
        model, tokenizer = loaded.model, loaded.tokenizer
        say(torch_models.describe(loaded))
    else:
        loaded = load_model(args.model)
        model, tokenizer = loaded.model, loaded.tokenizer
    if not preloaded:
        base_model = args.model if not Path(args.model).expanduser().exists() else str(Path(args.model).expanduser().resolve())
    if args.quantize and torch_models is None:
        _quantize_in_memory(model, say)

    splits = load_dataset(data_arg, tokenizer, valid_split=args.valid_split, test_split=args.test_split, seed=args.seed,
                          max_seq_length=args.max_seq_length, train_on_inputs=args.train_on_inputs,
                          chat_template=args.chat_template, prompt_key=args.prompt_key,
                          completion_key=args.completion_key, text_key=args.text_key,
                          messages_key=args.messages_key, cache=True)
    say(f"Data: {splits.summary()}")
    lazy = is_lazy(splits.train)  # tokenized as batches read it: lengths are estimates, so no packing

    evaluate = (torch_models.evaluate_loss if torch_models else evaluate_loss)
    if test_only:
        (torch_models.load_adapter if torch_models else load_adapter)(model, adapter_file, dropout=0.0)
        say(f"Evaluating {adapter_file} on the test set (no training: pass --iters to train).")
        result = TrainResult(adapter_file=adapter_file)
        _run_test(lambda records, n: evaluate(model, records, args.batch_size, args.max_seq_length, n), splits.test,
                  args, result, say)
        return result

    lora_kwargs = dict(lora_layers=args.lora_layers, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                       target_modules=args.target_modules, explicit_layers=lora_layers_explicit, seed=args.seed)
    if torch_models is not None:
        modules = torch_models.apply_lora(model, **lora_kwargs)
        adapter_config = torch_models.adapter_config(model, base_model=base_model)
        trainable, total = torch_models.count_parameters(model)
    else:
        modules = apply_lora(model, **lora_kwargs)
        adapter_config = AdapterConfig.of_model(model, base_model=base_model)
        trainable, total = count_parameters(model)
    say(f"Trainable parameters: {100 * trainable / max(total, 1):.3f}% ({_fmt_count(trainable)}/{_fmt_count(total)})")

    if args.iters > 0:  # the memory plan: one line; refuse, adapt (--auto-fit) or go on (--force)
        pack_ok = args.pack and not lazy and (torch_models is not None or model_parts(model).packing)
        args = check_memory(model, splits, args, backend=backend.name, device=backend.device, pack=pack_ok, say=say)
    needed = args.batch_size * args.grad_accumulation
    if args.iters > 0 and len(splits.train) < needed:
        accumulation = f" x --grad-accumulation {args.grad_accumulation}" if args.grad_accumulation > 1 else ""
        raise ConfigError(f"--batch-size {args.batch_size}{accumulation} needs at least {needed} training examples but "
                          f"{data_arg} has {len(splits.train)}: lower --batch-size or add data")
    callbacks = list(callbacks)
    if args.report_to == "wandb" and world.main:
        callbacks.append(_wandb_callback(args))
    if torch_models is not None:
        engine = torch_module("torch_engine").TorchEngine(model, args, backend.device, world=world)
        blocks, held, whole = engine.sharded
        if blocks:
            say(f"FSDP: {blocks} transformer blocks sharded across {world.size} ranks: each holds {held / 1e6:.3f} MB of "
                f"their {whole / 1e6:.3f} MB of frozen weights (LoRA weights, embedding and output head stay whole)")
    else:
        engine = MLXEngine(model, make_optimizer(args), args, world=world)
    pack = args.pack and not lazy and engine.packing
    if args.pack and not engine.packing:
        say("note: this architecture's attention cannot take a packed mask; training unpacked")
    elif args.pack and lazy:
        say("note: packing needs every example's token length, and this data is tokenized as batches read it: "
            "training unpacked (MLXTUNE_LAZY_TOKENIZE=0 tokenizes it first)")
    if args.iters > 0:
        pad = padding_fraction(splits.train, needed, max_seq_length=args.max_seq_length, seed=args.seed, pack=pack,
                               order=args.batch_order)
        kind, other = (("packed rows", "--no-pack") if pack else ("length-bucketed", "--pack")
                       if args.batch_order == "length" else ("random batches", "--batch-order length or --pack"))
        estimated = ", from the estimated lengths" if lazy else ""
        say(f"Batches: {100 * pad:.0f}% padding ({kind}{estimated}; {other} to compare)")

    def batches(start: int):
        return iterate_batches(splits.train, needed, max_seq_length=args.max_seq_length, seed=args.seed,
                               start_step=start, loop=True, shuffle=True, pack=pack,
                               order=args.batch_order)

    template = template_for(tokenizer, read_template_option(args.chat_template))
    fingerprint = settings_fingerprint(args, modules, base_model, data=records_fingerprint(splits.train),
                                       template=hashlib.sha256(template.encode()).hexdigest()[:16] if template else None)
    check_same_run(world, fingerprint, args.batch_size)
    if world.size > 1:
        say(world.describe())
    result = train(engine, batches, splits.valid, args, adapter_config=adapter_config, fingerprint=fingerprint,
                   callbacks=callbacks, verbose=verbose)
    if args.test and not result.interrupted:
        _run_test(engine.evaluate, splits.test, args, result, say)
    if preloaded:
        model.eval()  # dropout off: the model is used for generation next
        result.model_note = ("the adapter stays applied to the model passed in: mlxtune.generate(model, tokenizer, ...) "
                             "uses it; mlxtune.lora(model, ...) again replaces it")
        say(f"Note: {result.model_note}")
    return result


def _world(backend, args: TrainingArgs) -> World:
    """The processes this run trains in: mlx.launch's ranks on MLX, torchrun's on torch, or this one alone."""
    launched = torchrun_size()
    if backend.name == "torch":
        if args.fsdp and args.quantize and launched > 1:
            raise ConfigError("--fsdp cannot shard a 4-bit (NF4) base: drop --quantize, or train without --fsdp")
        if mlx_world().size > 1:
            raise ConfigError("mlx.launch started this process but the backend is torch: start torch ranks with "
                              "torchrun (torchrun --nproc-per-node N -m mlxtune lora --backend torch ...)")
        return torch_module("torch_engine").torch_world(backend.device)
    if launched > 1:
        raise ConfigError(f"torchrun started {launched} processes but this run's backend is mlx: pass --backend torch "
                          "(DDP on torch.distributed), or start MLX ranks with mlx.launch")
    if args.fsdp:
        raise ConfigError("--fsdp shards a model with torch (FSDP2): use it with --backend torch under torchrun")
    return mlx_world()


def _quantize_in_memory(model, say) -> None:
    """QLoRA from a float base on MLX: 4-bit, group 64, every linear/embedding layer whose width allows it."""
    if any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
        say("note: --quantize: the model is already quantized; training on it as it is")
        return
    nn.quantize(model, group_size=64, bits=4,
                class_predicate=lambda _, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0)
    if on_cpu():
        compute_dequantized(model)
    say("Quantized the base model to 4 bits in memory (group size 64) for QLoRA")


def _wandb_callback(args: TrainingArgs) -> Callable:
    # Opt-in only: nothing leaves the machine unless the user asks for it with --report-to wandb.
    try:
        import wandb
    except ImportError:
        raise ConfigError("--report-to wandb needs the wandb package: pip install wandb (or drop --report-to)") from None
    wandb.init(project="mlxtune", config=dataclasses.asdict(args))
    return lambda report: wandb.log(report, step=report["iteration"])


def _run_test(evaluate: Callable, records, args: TrainingArgs, result: TrainResult, say) -> None:
    """Test loss and perplexity; `evaluate(records, num_batches)` is the backend's evaluate_loss."""
    if not records:
        raise DataError(f"--test: the dataset {args.data} has no test split (add test.jsonl, or set --test-split)")
    loss = evaluate(records, args.test_batches)
    result.test_loss, result.test_perplexity = loss, math.exp(min(loss, 700.0))
    say(f"Test loss {loss:.3f}, Test ppl {result.test_perplexity:.3f}.")

