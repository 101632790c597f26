"""Token logprobs of the policy: log pi(token_t | tokens_<t), at the temperature each token was sampled with."""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperatures: torch.Tensor | float) -> torch.Tensor:
    """log pi(token_t | tokens_<t) for t >= 1, shape [batch, seq - 1].

    Logits are divided by the sampling temperature (one number, or one per position [batch, seq - 1]),
    so these are the logprobs of the distribution the rollout engine actually sampled from.
    """
    if isinstance(temperatures, torch.Tensor):
        temperatures = temperatures.clamp(min=1e-6).unsqueeze(-1)
    else:
        temperatures = max(temperatures, 1e-6)
    scaled = logits[:, :-1].float() / temperatures
    return torch.log_softmax(scaled, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
