"""Environment id -> how to make one.

    register("guess-number", "rollout.environments.guess_number:GuessNumber", max_value=100)
    env = make("guess-number", max_value=50)

An entry point is a class or factory, or its "module:attribute" path (imported on first `make`).
Installed distributions add environments without touching k2rl through the `k2rl.environments`
entry-point group:

    [project.entry-points."k2rl.environments"]
    my-env = "my_package.envs:MyEnv"
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from rollout.environments.base import Environment

ENTRY_POINT_GROUP = "k2rl.environments"


class EnvironmentConfigError(ValueError):
    """An environment cannot be made: unknown id, an entry point that fails to import, kwargs it rejects."""


@dataclass
class _Spec:
    entry_point: str | Callable[..., Environment]
    kwargs: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, _Spec] = {}
_scanned = False
# Environment ids that an installed entry point declares a second time (a built-in's, or another
# entry point's): id -> the entry point. Making one is refused rather than picking either.
_CONFLICTS: dict[str, str] = {}


def register(env_id: str, entry_point: str | Callable[..., Environment], **default_kwargs: Any) -> None:
    """Register `entry_point` as `env_id`; `default_kwargs` go to every `make` (overridable)."""
    existing = _REGISTRY.get(env_id)
    if existing is not None and existing.entry_point != entry_point:
        raise EnvironmentConfigError(f"environment {env_id!r} is already registered to {existing.entry_point!r}")
    _REGISTRY[env_id] = _Spec(entry_point, dict(default_kwargs))


def make(env_id: str, **kwargs: Any) -> Environment:
    """A new environment instance; one clear error naming the environment when it cannot be made."""
    factory, defaults = resolve(env_id)
    return instantiate(env_id, factory, {**defaults, **kwargs})


def resolve(env_id: str) -> tuple[Callable[..., Environment], dict[str, Any]]:
    """The class or function that makes `env_id` (its module imported) and its registered default kwargs."""
    spec = _spec(env_id)
    return _resolve(env_id, spec.entry_point), dict(spec.kwargs)


def instantiate(env_id: str, factory: Callable[..., Environment], kwargs: dict[str, Any]) -> Environment:
    """`factory(**kwargs)`, its failure turned into one EnvironmentConfigError naming `env_id`.

    Separate from `make` so that an environment worker, whose process has its own registry, can
    build what the driver resolved.
    """
    try:
        return factory(**kwargs)
    except TypeError as error:
        raise _rejected(env_id, kwargs, error) from None
    except Exception as error:  # noqa: BLE001 - the user's constructor: name it, keep the cause
        raise EnvironmentConfigError(f"environment {env_id!r} failed to start: {type(error).__name__}: {error}") from error


def check_arguments(env_id: str, factory: Callable[..., Environment], kwargs: dict[str, Any]) -> None:
    """Raise the error `instantiate` would for kwargs that `factory` cannot take, without calling it:
    for environments made in another process, so that a misconfiguration fails where it is made."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # no signature to read (a builtin): the call itself will tell
        return
    try:
        signature.bind(**kwargs)
    except TypeError as error:
        raise _rejected(env_id, kwargs, error) from None


def check(env_id: str, kwargs: dict[str, Any]) -> None:
    """Raise EnvironmentConfigError now for an environment that `make` could not build: an unknown id,
    an entry point that fails to import, kwargs its constructor does not take."""
    factory, defaults = resolve(env_id)
    check_arguments(env_id, factory, {**defaults, **kwargs})


def _rejected(env_id: str, kwargs: dict[str, Any], error: TypeError) -> EnvironmentConfigError:
    return EnvironmentConfigError(f"environment {env_id!r} rejects its arguments {sorted(kwargs)}: {error}")


def env_ids() -> list[str]:
    _scan_entry_points()
    return sorted(_REGISTRY)


def _spec(env_id: str) -> _Spec:
    _scan_entry_points()
    if env_id in _CONFLICTS:
        raise EnvironmentConfigError(
            f"environment {env_id!r} is registered to {_REGISTRY[env_id].entry_point!r} and also declared by the "
            f"installed entry point {_CONFLICTS[env_id]!r}: rename the entry point's environment"
        )
    if env_id not in _REGISTRY:
        raise EnvironmentConfigError(f"unknown environment {env_id!r} (registered: {', '.join(env_ids()) or 'none'})")
    return _REGISTRY[env_id]


def _scan_entry_points() -> None:
    global _scanned
    if _scanned:
        return
    _scanned = True
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in _REGISTRY:
            _CONFLICTS[entry.name] = entry.value
        else:
            _REGISTRY[entry.name] = _Spec(entry.value)


def _resolve(env_id: str, entry_point: str | Callable[..., Environment]) -> Callable[..., Environment]:
    if callable(entry_point):
        return entry_point
    module, _, attribute = entry_point.partition(":")
    try:
        target = importlib.import_module(module)
        for part in attribute.split(".") if attribute else []:
            target = getattr(target, part)
    except Exception as error:  # noqa: BLE001 - any import failure of a plugin: name it
        raise EnvironmentConfigError(
            f"environment {env_id!r}: entry point {entry_point!r} failed to import: {type(error).__name__}: {error}"
        ) from None
    if not callable(target):
        raise EnvironmentConfigError(f"environment {env_id!r}: entry point {entry_point!r} is not a class or function")
    return target
