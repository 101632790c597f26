"""K2 budget control: a response cut at its token budget earns a fixed penalty.

Scoring a truncated response on its content would reward long answers that
happen to contain the right tokens before the cut, so the task reward is
replaced, not adjusted. It is kept in `components` for logging.
"""

from __future__ import annotations

from rl.records import RewardResult


def apply_budget(result: RewardResult, truncated: bool, penalty: float) -> RewardResult:
    """Replace `result` with `penalty` if the response hit its token budget (a failed reward stays failed)."""
    if not truncated or result.failed:
        return result
    return RewardResult(
        score=penalty,
        reason="over_budget",
        components={**result.components, "task_reward": result.score, "budget_penalty": penalty},
    )
