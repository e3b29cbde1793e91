"""Reward and preference models: heads, losses, training, scoring (``preftune rm``)."""

from .heads import Head
from .losses import REWARD_LOSSES, RewardInputs, get_reward_loss, reward_loss
from .model import RewardModel

__all__ = ["Head", "REWARD_LOSSES", "RewardInputs", "RewardModel", "get_reward_loss",
           "reward_loss"]
