"""preftune: preference optimization for language models on one fast, verified spine.

The Python API is ``preftune.api`` (``from preftune.api import Config, train``). Its names
are also reachable here (``preftune.Config``, ``preftune.register_objective``, ...), loaded on
first use so ``import preftune`` stays fast; not ``train``, ``evaluate`` and ``compare``, which
here are preftune's subpackages.
"""

from .model.quantize import quiet_bitsandbytes

__version__ = "0.1.0"
quiet_bitsandbytes()

# preftune.api.__all__ less the names of subpackages (a test keeps the two in step)
_API_NAMES = {"Config", "ConfigError", "DiffusionConfig", "FlipRate", "NoParams",
              "NonNegative", "ObjectiveInputs", "ObjectiveOutput", "ObjectiveState",
              "ObjectivesFailed", "OnlineConfig", "Positive", "RewardConfig", "RunningMean",
              "Share", "evaluate_diffusion", "evaluate_reward_model", "fit_compositional",
              "load_scorer",
              "preference_strength", "register_objective", "register_scorer", "run_online",
              "score_with_reward_model", "train_diffusion", "train_reward_model",
              "tree_pairs", "pairs_from_commits", "relevance_pairs", "write_report"}


def __getattr__(name: str):
    if name in _API_NAMES:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'preftune' has no attribute {name!r}")
