"""Shared fixtures: small tokenizers and models built in-process (no downloads)."""

import pytest

from tiny_models import build_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()
