"""The bundled default model, dataset and LoRA settings (the `data/` folder of the source tree).

`mlxtune lora` with no --model/--data trains the tiny chat model in data/tiny-chat on the tool-call task
in data/toolcall, with the settings in data/default-lora.yaml (command-line flags still win); `generate`,
`chat` and `eval` use the same model (and data) when they are left out. `scripts/build_default.py`
rebuilds all three from nothing. The one thing to know: `fill_in` is the only place that decides when the
bundle stands in, and it always says so in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_MODEL = DATA_DIR / "tiny-chat"
DEFAULT_DATA = DATA_DIR / "toolcall"
DEFAULT_LORA_CONFIG = DATA_DIR / "default-lora.yaml"
HINT = "use a real model with --model mlx-community/... and your data with --data DIR"


@dataclass
class Filled:
    model: object
    data: object
    note: str | None  # what the bundle stood in for, to print; None when nothing was filled in
    training: bool = False  # the bundled training settings (DEFAULT_LORA_CONFIG) apply


def require_bundled() -> tuple[Path, Path]:
    if not (DEFAULT_MODEL / "config.json").exists() or not (DEFAULT_DATA / "train.jsonl").exists():
        raise ConfigError(
            f"the bundled default model/data are not in {DATA_DIR} (they ship with the source checkout): "
            "pass --model and --data"
        )
    return DEFAULT_MODEL, DEFAULT_DATA


def fill_in(model, data=None, *, verb: str = "generate") -> Filled:
    """The bundled model and data where `model` / `data` are None.

    verb "lora": both or neither (a user's model on the demo data, or the reverse, is a mistake);
    "eval": either may be left out; "generate" (and chat): only the model is filled in.
    """
    if verb == "lora":
        if model is None and data is not None:
            raise ConfigError("--data was given but no --model: pass --model (a directory or a hub id like mlx-community/...)")
        if data is None and model is not None:
            raise ConfigError("--model was given but no --data: pass --data DIR (train.jsonl, valid.jsonl) or a .jsonl file")
    if model is not None and (data is not None or verb == "generate"):
        return Filled(model, data, None)
    bundled_model, bundled_data = require_bundled()
    if verb == "lora":
        return Filled(str(bundled_model), str(bundled_data), training=True, note=(
            f"Training the bundled demo model {bundled_model} on the tool-call data in {bundled_data} (a small demo): {HINT}"))
    used = []
    if model is None:
        model = str(bundled_model)
        used.append(f"the bundled tiny model {bundled_model}")
    if data is None and verb == "eval":
        data = str(bundled_data)
        used.append(f"the bundled data {bundled_data}")
    return Filled(model, data, f"Using {' and '.join(used)} ({HINT})")
