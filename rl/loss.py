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


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(token_t | tokens_<t) for t >= 1, shape [batch, seq - 1].

    Logits are divided by the sampling temperature, so these are the logprobs of the
    distribution the rollout engine actually sampled from.
    """
    scaled = logits[:, :-1].float() / max(temperature, 1e-6)
    return torch.log_softmax(scaled, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def k2_policy_loss(
    logprob_sums: torch.Tensor, old_logprob_sums: torch.Tensor, advantages: torch.Tensor, tau: float
) -> torch.Tensor:
    """Per-sample squared error of the K2 objective (callers average it over the batch)."""
    log_ratio = logprob_sums - old_logprob_sums
    return (advantages - tau * log_ratio) ** 2
