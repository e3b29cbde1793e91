"""Command-line argument types: counts checked when the command line is read, so a bad value
is one line of usage error, not a traceback from deep inside a run."""

from __future__ import annotations

import argparse


def at_least(lowest: int):
    """An argparse ``type``: an integer no smaller than ``lowest``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {value}")
        return value

    parse.__name__ = f"integer >= {lowest}"
    return parse


POSITIVE, COUNT = at_least(1), at_least(0)
