"""Shared fixtures: small tokenizers and models built in-process (no downloads). The
benchmarks' folder is importable too (its ``common.PhaseMemory`` counts tensor bytes)."""

import sys
from pathlib import Path

import pytest

from tiny_models import build_tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()
