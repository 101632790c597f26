"""Name -> reward function registry.

Tasks name their reward (`Task.reward`) instead of carrying code, so a task file
stays plain data and every process that scores it, including worker processes,
can resolve the same name to the same function. Rewards come from two places:
modules in this package that use `@register`, and installed distributions that
declare a `k2rl.rewards` entry point, so new rewards ship without editing this
package.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Protocol

from rl.records import RewardResult, Task

RewardFn = Callable[[Task, str], RewardResult]
"""Scores one response (the decoded text) to one task."""


class RewardContext(Protocol):
    """What a group reward may use besides the responses: a model to generate with (the critic)."""

    async def generate(self, conversations: list[list[dict[str, str]]], max_tokens: int, temperature: float = 0.0) -> list[str]:
        """One reply per conversation (chat messages), from the critic: the policy of the current
        weight version on the rollout engines, or the critic that `reward.critic` configures."""
        ...


GroupRewardFn = Callable[[Task, list[str], RewardContext], Awaitable[list[RewardResult]]]
"""Scores a whole group: the K responses (decoded texts) to one task, in order, one result each."""


def group_reward(fn: GroupRewardFn) -> GroupRewardFn:
    """Mark an async `(task, responses, context) -> list[RewardResult]` function as a group reward
    (register it with `@register` as any reward; entry points work the same)."""
    fn.scores_groups = True  # type: ignore[attr-defined]
    return fn


def is_group_reward(fn: Any) -> bool:
    return bool(getattr(fn, "scores_groups", False))


def blocking_reward(fn: RewardFn) -> RewardFn:
    """Mark a per-response reward that blocks on I/O (a sandbox, a service). Without scorer
    processes, the rollout scores it in a thread of its own, so that generation goes on meanwhile
    and several such rewards wait at once; other rewards run in the rollout's loop, one at a time."""
    fn.blocks = True  # type: ignore[attr-defined]
    return fn


def is_blocking_reward(fn: Any) -> bool:
    return bool(getattr(fn, "blocks", False))


SpecCheck = Callable[[Task], None]
"""Raises ValueError, naming the task, when a reward could not score any response to it."""


def checks_spec(check: SpecCheck) -> Callable[[RewardFn], RewardFn]:
    """Give a reward a check of one task's `reward_spec` (put it under `@register`). A run puts its
    held-out tasks through it before any process starts: an evaluation counts a task its reward
    cannot score as a wrong answer, a silent loss of accuracy at every evaluation."""

    def decorator(fn: RewardFn) -> RewardFn:
        fn.check_spec = check  # type: ignore[attr-defined]
        return fn

    return decorator


def check_reward_spec(task: Task) -> None:
    """Run the check of the task's reward, if it has one (a task with no reward has nothing to check)."""
    check = getattr(get_reward(task.reward), "check_spec", None) if task.reward else None
    if check is not None:
        check(task)


ENTRY_POINT_GROUP = "k2rl.rewards"

_REWARDS: dict[str, RewardFn] = {}

# Discovered entry points, by name. Filled on the first lookup (a directory walk over sys.path),
# which also tells whether an entry point takes the name of a reward registered here.
_entry_points: dict[str, EntryPoint] | None = None
# The names in _REWARDS that were loaded from their entry point.
_loaded_entry_points: set[str] = set()


class UnknownRewardError(ValueError):
    """No registered reward or entry point has the requested name."""


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register the decorated function as the reward called `name`.

    Registering a second, different function under a taken name raises, since
    silently replacing a reward would change what a run optimises. Registering
    the same function again is allowed so that re-importing a module is harmless.
    """

    def decorator(fn: RewardFn) -> RewardFn:
        existing = _REWARDS.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(
                f"reward {name!r} is already registered to "
                f"{existing.__module__}.{existing.__qualname__}"
            )
        _REWARDS[name] = fn
        return fn

    return decorator


def get_reward(name: str) -> RewardFn:
    """Return the reward called `name`, loading it from its entry point if needed."""
    entry_point = _discovered_entry_points().get(name)
    if name in _REWARDS:
        if entry_point is not None and name not in _loaded_entry_points:
            existing = _REWARDS[name]
            raise ValueError(
                f"reward {name!r} is registered to {existing.__module__}.{existing.__qualname__} and also declared by "
                f"the installed entry point {entry_point.value}: rename the entry point's reward"
            )
        return _REWARDS[name]
    if entry_point is None:
        raise UnknownRewardError(
            f"unknown reward {name!r} (registered: {', '.join(reward_names())})"
        )
    declared = {ep.value for ep in entry_points(group=ENTRY_POINT_GROUP, name=name)}
    if len(declared) > 1:
        raise ValueError(f"reward {name!r} is declared by more than one installed entry point: {', '.join(sorted(declared))}")
    _REWARDS[name] = _load(entry_point)
    _loaded_entry_points.add(name)
    return _REWARDS[name]


def reward_names() -> list[str]:
    """All reward names: registered ones and those declared by entry points."""
    return sorted(_REWARDS.keys() | _discovered_entry_points().keys())


def _discovered_entry_points() -> dict[str, EntryPoint]:
    global _entry_points
    if _entry_points is None:
        _entry_points = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return _entry_points


def _load(entry_point: EntryPoint) -> RewardFn:
    """Import an entry point's function, naming the entry point if that fails.

    The bare import error would only name a module, which does not tell the
    reader which reward, or which installed plugin, is broken.
    """
    try:
        return entry_point.load()
    except Exception as exc:
        raise ImportError(
            f"reward entry point {entry_point.name!r} ({entry_point.value}) "
            f"failed to load: {type(exc).__name__}: {exc}"
        ) from exc
