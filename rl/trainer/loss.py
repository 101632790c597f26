"""The K1.5/K2 policy objective.

For each prompt x with K sampled responses y_i from pi_old:

    L = 1/K * sum_i ( r(x, y_i) - rbar(x) - tau * log(pi_theta(y_i|x) / pi_old(y_i|x)) )^2

rbar is the group's mean reward; log pi(y|x) sums the response tokens' logprobs.
There is no value network and no frozen reference model: the squared log-ratio
term keeps several optimizer steps on one batch close to pi_old.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch


def group_advantages(rewards: list[float], group_ids: list[Hashable]) -> list[float]:
    """r_i - rbar(x): each reward minus the mean reward of the responses to the same prompt."""
    totals: dict[Hashable, list[float]] = {}
    for reward, group in zip(rewards, group_ids):
        totals.setdefault(group, []).append(reward)
    means = {group: sum(values) / len(values) for group, values in totals.items()}
    return [reward - means[group] for reward, group in zip(rewards, group_ids)]


def k2_policy_loss(
    logprob_sums: torch.Tensor, old_logprob_sums: torch.Tensor, advantages: torch.Tensor, tau: float
) -> torch.Tensor:
    """Per-sample squared error of the K2 objective (callers average it over the batch)."""
    log_ratio = logprob_sums - old_logprob_sums
    return (advantages - tau * log_ratio) ** 2
