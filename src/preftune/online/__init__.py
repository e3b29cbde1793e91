"""Online and iterative preference learning: sample from the policy, score, build pairs or
lists, train with any registered objective, evaluate; repeat (``preftune online``)."""

from .build import BUILDERS, build_rows, positions, rso_pairs, win_probs
from .config import OnlineConfig, load_online_config

__all__ = ["BUILDERS", "OnlineConfig", "build_rows", "load_online_config", "positions",
           "rso_pairs", "win_probs"]
