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


@pytest.fixture
def registries():
    """Objectives and scorers registered by a test are forgotten after it."""
    from preftune.objectives.registry import REGISTRY
    from preftune.score.function import SCORERS

    saved = dict(REGISTRY), dict(SCORERS)
    yield
    for registry, before in zip((REGISTRY, SCORERS), saved):
        registry.clear()
        registry.update(before)
