"""Reward functions and the machinery that scores responses with them.

Importing the package registers the built-in rewards, so that any process,
including a scorer worker, sees them once it has imported `rewards`.
"""

from rewards import code  # noqa: F401  (registers "code")
from rewards import math_answer  # noqa: F401  (registers "math")
from rewards import instruction  # noqa: F401  (registers "instruction")
from rewards import puzzle  # noqa: F401  (registers "puzzle")
from rewards import rubric  # noqa: F401  (registers "rubric" and "critic_verdict")
from rewards import judge  # noqa: F401  (registers "judge")
from rewards.budget import apply_budget
from rewards.registry import (
    GroupRewardFn,
    RewardContext,
    RewardFn,
    UnknownRewardError,
    blocking_reward,
    check_reward_spec,
    checks_spec,
    get_reward,
    group_reward,
    is_group_reward,
    register,
    reward_names,
)
from rewards.scoring import RewardScorer

__all__ = [
    "GroupRewardFn",
    "RewardContext",
    "RewardFn",
    "RewardScorer",
    "UnknownRewardError",
    "apply_budget",
    "blocking_reward",
    "check_reward_spec",
    "checks_spec",
    "get_reward",
    "group_reward",
    "is_group_reward",
    "register",
    "reward_names",
]
