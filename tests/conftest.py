import os

import pytest

# torch's spinning OpenMP threads slow it ~100x on a CPU shared with other processes (see mlxtune/__init__.py);
# tests import torch before mlxtune can set this, so it is set here, before any test module loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tiny import make_tiny_model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A 2-block random llama with a ChatML BPE tokenizer (float32, HF layout)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session", autouse=True)
def _data_cache_in_tmp(tmp_path_factory):
    """Tokenization caches (mlxtune.data, $MLXTUNE_CACHE) go to a temp dir, never ~/.cache, in tests."""
    os.environ["MLXTUNE_CACHE"] = str(tmp_path_factory.mktemp("mlxtune_cache"))
