"""Environments for the rollout layer: the interface, the registry, and the built-in environments.

    from rollout.environments import Environment, make, register

See base.py for the interface and registry.py for registration and entry points.
"""

from rollout.environments.base import Environment, Message, ResetResult, SingleTurn, StepResult
from rollout.environments.registry import ENTRY_POINT_GROUP, EnvironmentConfigError, env_ids, make, register

__all__ = [
    "ENTRY_POINT_GROUP",
    "Environment",
    "EnvironmentConfigError",
    "Message",
    "ResetResult",
    "SingleTurn",
    "StepResult",
    "env_ids",
    "make",
    "register",
]
