"""`--data` from the Hugging Face `datasets` library: a hub dataset id, or a folder written by `save_to_disk`.

Optional (`pip install mlxtune[datasets]`). The one thing to know: a dataset's rows become the same
records as the lines of a JSONL file. Each split is a `token_cache.Source` read in Arrow batches, named
`ID[split]` in messages (`ID[train]:17` is row 17, counted from 1), detected and tokenized per record like
a file, and cached under a hash of its Arrow files. Hub ids go through `datasets.load_dataset`, which keeps
its own cache and honours HF_HUB_OFFLINE=1 (then only datasets already in that cache load).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .errors import DataError
from .token_cache import Source, content_key

# The `datasets` library's split names -> ours.
SPLIT_NAMES = {"train": "train", "validation": "valid", "valid": "valid", "dev": "valid", "test": "test"}
ROWS_PER_READ = 1000
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file()
                                                      and (path / "dataset_info.json").is_file())


def looks_like_hub_id(text: str) -> bool:
    """`owner/name` or `name`, not a file name: what `--data` may mean when no such path exists."""
    return bool(HUB_ID.fullmatch(text)) and not text.endswith((".jsonl", ".json")) and ".." not in text


def _library():
    # Optional and heavy (pyarrow, pandas): imported only when --data names a dataset.
    try:
        import datasets
    except ImportError:
        raise DataError("reading a Hugging Face dataset needs the `datasets` library: "
                        "pip install 'mlxtune[datasets]'") from None
    return datasets


def dataset_sources(spec: str | Path) -> list[tuple[Source, str | None]]:
    """(source, split) for each split of a saved folder or hub dataset, splits named like `data._resolve_inputs`."""
    datasets = _library()
    if isinstance(spec, Path):
        try:
            loaded = datasets.load_from_disk(str(spec))
        except (FileNotFoundError, ValueError, OSError) as e:
            raise DataError(f"--data {spec}: not a readable dataset folder ({type(e).__name__}: {e})") from None
        name = str(spec)
    else:
        try:
            loaded = datasets.load_dataset(spec)
        except (ConnectionError, FileNotFoundError, ValueError) as e:
            raise DataError(f"--data {spec}: no such file or folder, and no Hugging Face dataset of that id could "
                            f"be loaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); with "
                            "HF_HUB_OFFLINE=1 only datasets already in the local cache load") from None
        name = spec
    if isinstance(loaded, datasets.DatasetDict):
        splits = {}
        for split, ds in loaded.items():
            ours = SPLIT_NAMES.get(split)
            if ours is None:
                raise DataError(f"--data {name}: split {split!r} is not one of {', '.join(SPLIT_NAMES)}")
            splits[ours] = (split, ds)
        if "train" not in splits:
            raise DataError(f"--data {name} has no train split (it has {', '.join(loaded)})")
        if "valid" not in splits:  # like a folder without valid.jsonl: validation is held out of train
            splits["train+valid"] = splits.pop("train")
        return [(_source(f"{name}[{split}]", ds), ours) for ours, (split, ds) in splits.items()]
    return [(_source(name, loaded), None)]


def _drop_nones(value: Any) -> Any:
    """Arrow gives every row every field (None where the JSON had none): drop those, as the JSON would."""
    if isinstance(value, dict):
        return {k: _drop_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nones(v) for v in value]
    return value


def _source(name: str, ds) -> Source:
    files = [Path(f["filename"]) for f in ds.cache_files]

    def records(bar):
        for start in range(0, len(ds), ROWS_PER_READ):
            batch = ds[start:start + ROWS_PER_READ]
            columns = list(batch)
            for k, values in enumerate(zip(*(batch[c] for c in columns))):
                yield start + k + 1, _drop_nones(dict(zip(columns, values)))
            if bar is not None:
                bar.update(min(ROWS_PER_READ, len(ds) - start))

    def identity() -> str:
        # The Arrow files are the content; a dataset held only in memory has its own fingerprint.
        return content_key(name, str(len(ds)), files=files) if files else content_key(name, ds._fingerprint)

    return Source(name, records, identity, len(ds), unit="rows")
