"""Where tasks come from: task files (rl/data/sources.py), the built-in arithmetic generator
(rl/data/arithmetic.py), and the prompt sampler (rl/data/sampler.py)."""

from rl.data.arithmetic import DEFAULT_KINDS, arithmetic_eval_tasks
from rl.data.sampler import PromptSampler
from rl.data.sources import load_tasks

__all__ = ["PromptSampler", "arithmetic_eval_tasks", "load_tasks", "load_eval_tasks", "load_train_pool"]


def load_train_pool(path: str, columns: dict[str, str]):
    """The training tasks of a file, or None for the built-in generator."""
    return load_tasks(path, columns) if path else None


def load_eval_tasks(path: str, columns: dict[str, str], size: int, kinds: tuple[str, ...] = DEFAULT_KINDS):
    return load_tasks(path, columns)[:size] if path else arithmetic_eval_tasks(size, kinds)
