import pytest

from tiny import make_tiny_model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A 2-block random llama with a ChatML BPE tokenizer (float32, HF layout)."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_llama"))
