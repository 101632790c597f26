"""K1.5 length reward: among one prompt's responses, shorter ones earn more.

Long chains of thought cost tokens and, past a point, accuracy (overthinking). Kimi K1.5 (§2.3.3)
adds to each response's reward, within its group of K responses to the same prompt:

    lambda_i = 0.5 - (len_i - min_len) / (max_len - min_len)

    length reward_i = weight * lambda_i            if the response is correct (reward >= 1.0)
                      weight * min(0, lambda_i)    otherwise

where len counts the response's generated tokens only (not the prompt, nor an environment's
turns). The shortest response gets +0.5 weight, the longest -0.5; wrong answers are only ever
penalised, so being short never pays for being wrong. A group whose responses are all as long
has no length reward. As in K1.5 it is off during a warm-up (`warmup_steps`), so that the policy
first learns to solve the tasks, and the length pressure comes after.

Pass only the responses that train (those with a reward); a response with a failed reward must
not set the group's shortest or longest length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# A response with at least this reward counts as correct.
CORRECT_REWARD = 1.0


def length_lambdas(group: Sequence[tuple[float, int]]) -> list[float]:
    """K1.5's length reward, unweighted, for a group of (reward, generated length) pairs."""
    lengths = [length for _, length in group]
    shortest, longest = min(lengths, default=0), max(lengths, default=0)
    if shortest == longest:
        return [0.0] * len(group)
    rewards = []
    for reward, length in group:
        share = 0.5 - (length - shortest) / (longest - shortest)
        rewards.append(share if reward >= CORRECT_REWARD else min(0.0, share))
    return rewards


@dataclass(frozen=True)
class LengthReward:
    """The length reward as configured: `weight` (0 turns it off) after `warmup_steps` training steps."""

    weight: float = 0.0
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ValueError(f"reward.length.weight must be >= 0 (0 turns the length reward off), got {self.weight}")
        if self.warmup_steps < 0:
            raise ValueError(f"reward.length.warmup_steps must be >= 0, got {self.warmup_steps}")

    def additions(self, group: Sequence[tuple[float, int]], step: int) -> list[float]:
        """What to add to each response's reward, in the step that follows `step` completed ones."""
        if self.weight == 0 or step < self.warmup_steps:
            return [0.0] * len(group)
        return [self.weight * value for value in length_lambdas(group)]
