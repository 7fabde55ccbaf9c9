"""The bundled default model, dataset and LoRA settings (the `data/` folder of the source tree).

`mlxtune lora` with no --model/--data trains the tiny chat model in data/tiny-chat on the tool-call task
in data/toolcall, with the settings in data/default-lora.yaml (command-line flags still win).
`scripts/build_default.py` rebuilds all three from nothing.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DEFAULT_MODEL = DATA_DIR / "tiny-chat"
DEFAULT_DATA = DATA_DIR / "toolcall"
DEFAULT_LORA_CONFIG = DATA_DIR / "default-lora.yaml"
HINT = "use a real model with --model mlx-community/... and your data with --data DIR"


def require_bundled() -> tuple[Path, Path]:
    if not (DEFAULT_MODEL / "config.json").exists() or not (DEFAULT_DATA / "train.jsonl").exists():
        raise ConfigError(
            f"the bundled default model/data are not in {DATA_DIR} (they ship with the source checkout): "
            "pass --model and --data"
        )
    return DEFAULT_MODEL, DEFAULT_DATA
