"""Environments for the rollout layer: the interface, the registry, the host, and the built-in environments.

    from rollout.environments import EnvironmentHost, Environment, make, register

See base.py for the interface, registry.py for registration and entry points, host.py for where
an environment runs. Built in: "guess-number" (guess_number.py), "reasoning-gym" (reasoning_gym.py),
"python-tool" (python_tool.py).
"""

from rollout.environments.base import Environment, Message, ResetResult, SingleTurn, StepResult
from rollout.environments.host import EnvironmentHost, EnvironmentWorkerError
from rollout.environments.registry import ENTRY_POINT_GROUP, EnvironmentConfigError, check, env_ids, make, register

# By path: a built-in's module (and what it imports, e.g. reasoning_gym) loads on its first use.
register("guess-number", "rollout.environments.guess_number:GuessNumber")
register("reasoning-gym", "rollout.environments.reasoning_gym:ReasoningGym")
register("python-tool", "rollout.environments.python_tool:PythonTool")

__all__ = [
    "ENTRY_POINT_GROUP",
    "Environment",
    "EnvironmentConfigError",
    "EnvironmentHost",
    "EnvironmentWorkerError",
    "Message",
    "ResetResult",
    "SingleTurn",
    "StepResult",
    "check",
    "env_ids",
    "make",
    "register",
]
