"""Fine-tune-aware quantization (`--keep-adapter ADAPTER`): quantize a fused model so the fine-tune survives.

Two changes to a type's plain recipe, both driven by the adapter that was fused in:

1. Tensors get a higher type by how the adapter's change compares with their quantization step: for each
   adapted tensor, the update's size (RMS of scale * B A) over the RMS rounding error the planned type makes
   on the fused weight. The tensors where that ratio is lowest, whose update is most at risk of being
   rounded away, move up one step (Q4_K -> Q6_K, Q4_0 / Q5_0 / Q6_K -> Q8_0), up to `PROMOTE_SHARE` of the
   adapted weights. (Promoting the highest ratios instead, the tensors the adapter changed most, measured
   worse: docs/benchmarks.md.)
2. Every quantized tensor's scale search weighs its columns by the importance matrix measured with MLX on
   the adapter's training data (`importance.py`).

The one thing to know: the plan only changes types and scale choices; the file is still an ordinary GGUF
that any llama.cpp loads. The imatrix is recorded under llama-quantize's own `quantize.imatrix.*` keys.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants

from .importance import importance_matrix, source_data
from .lora import adapter_tensors
from .quants import rounded

PROMOTE_SHARE = 0.25  # of the adapted tensors' values, the share that moves up one type
SAMPLE_ROWS = 256  # rows per tensor used to measure the rounding error
_UP = {Q.Q4_0: Q.Q8_0, Q.Q4_K: Q.Q6_K, Q.Q5_0: Q.Q8_0, Q.Q6_K: Q.Q8_0}  # Q8_0 and above stay as they are


@dataclass
class TensorScore:
    name: str
    qtype: Q  # the planned type
    update_rms: float
    error_rms: float  # rounding error of the planned type on the fused weight
    promoted_to: Q | None = None

    @property
    def score(self) -> float:
        return self.update_rms / self.error_rms if self.error_rms > 0 else float("inf")


@dataclass
class KeepAdapterPlan:
    adapter: Path
    data: Path
    tokens: int  # tokens the importance matrix was measured on
    importance: dict[str, np.ndarray] = field(default_factory=dict)
    scores: list[TensorScore] = field(default_factory=list)

    @property
    def promoted(self) -> dict[str, Q]:
        return {s.name: s.promoted_to for s in self.scores if s.promoted_to is not None}

    def summary(self) -> str:
        moved = [s for s in self.scores if s.promoted_to is not None]
        kinds = sorted({f"{s.qtype.name}->{s.promoted_to.name}" for s in moved})
        return (f"keep-adapter: {len(moved)} of {len(self.scores)} adapted tensors moved up ({', '.join(kinds) or 'none'}); "
                f"{self.at_risk()}; importance matrix for {len(self.importance)} tensors from {self.tokens} tokens of "
                f"{self.data}")

    def at_risk(self) -> str:
        """How the adapter's update compares with the plain recipe's rounding error, tensor by tensor.

        Why say it: where every update is well above its rounding error (seen on the bundled task and on
        SmolLM2, docs/benchmarks.md), rounding does not remove the fine-tune (a projection onto the update keeps
        99.9% of it) and plain types keep the adapter's replies too; the flag then only lowers the noise."""
        ratios = sorted(s.score for s in self.scores)
        if not ratios:
            return "no adapted tensor is quantized"
        below = sum(r < 1 for r in ratios)
        return (f"update / rounding error {ratios[0]:.2g}x to {ratios[-1]:.2g}x (median {ratios[len(ratios) // 2]:.2g}x), "
                f"{below} of {len(ratios)} tensors below 1x")


def up_type(qtype: Q, cols: int) -> Q | None:
    """The next safer type for a tensor of `cols` columns, or None when there is none worth having."""
    up = _UP.get(qtype)
    while up is not None and cols % gguf_quants.GGML_QUANT_SIZES[up][0] != 0:
        up = _UP.get(up)
    return up


def plan_keep_adapter(model_dir: Path, adapter_file: str | os.PathLike, data, planned, arch, cfg: dict, *,
                      share: float = PROMOTE_SHARE, progress: bool = True) -> KeepAdapterPlan:
    """Score the adapted tensors of `planned` (the writer's tensor plan) and measure the importance matrix."""
    scale, updates = adapter_tensors(adapter_file, model_dir, arch, cfg)
    by_name = {p.name: p for p in planned}
    scores = []
    for name, (lora_a, lora_b) in updates.items():
        p = by_name.get(name)
        if p is None or p.qtype in (Q.F32, Q.F16, Q.BF16):
            continue
        rows = np.linspace(0, p.rows - 1, min(p.rows, SAMPLE_ROWS)).astype(int)
        weight = np.concatenate([p.read(int(r), int(r) + 1) for r in rows])
        error = rounded(weight, p.qtype) - weight
        update = scale * (lora_b @ lora_a)  # HF row order; the writer's q/k row permutation changes no RMS
        scores.append(TensorScore(name, p.qtype, float(np.sqrt(np.mean(update * update))),
                                  float(np.sqrt(np.mean(error * error)))))
    plan = KeepAdapterPlan(Path(adapter_file), source_data(data), 0, scores=scores)
    total = sum(by_name[s.name].rows * by_name[s.name].cols for s in scores)
    budget = share * total
    for s in sorted(scores, key=lambda s: s.score):  # most at risk first
        p = by_name[s.name]
        up = up_type(s.qtype, p.cols)
        if up is None or budget <= 0:
            continue
        s.promoted_to = up
        budget -= p.rows * p.cols
    plan.importance, plan.tokens = importance_matrix(model_dir, plan.data, arch, cfg, progress=progress)
    return plan
