"""preftune: preference optimization for language models on one fast, verified spine."""

__version__ = "0.1.0"
