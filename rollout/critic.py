"""Critics: what a group reward generates with (rewards.RewardContext). The default critic is the
policy itself, at the current weight version, on the rollout engines: K2's self-critique."""

from __future__ import annotations

import asyncio
import itertools

from rollout.engine import GenerationRequest
from rollout.rendering import Renderer


class PolicyCritic:
    """Generates on the run's own engines, with the weights being trained, in the same batches as
    the episodes that are still running."""

    def __init__(self, pool, renderer: Renderer, max_model_len: int):
        self.pool, self.renderer, self.max_model_len = pool, renderer, max_model_len
        self._ids = itertools.count()

    async def generate(self, conversations: list[list[dict[str, str]]], max_tokens: int, temperature: float = 0.0) -> list[str]:
        async def one(messages: list[dict[str, str]]) -> str:
            prompt = self.renderer.prompt(messages)
            room = min(max_tokens, self.max_model_len - len(prompt))
            if room <= 0:
                raise ValueError(f"a critic prompt of {len(prompt)} tokens leaves no room in rollout.max_model_len={self.max_model_len}")
            request = GenerationRequest(f"critic/{next(self._ids)}", tuple(prompt), room, temperature, seed=0 if temperature > 0 else None)
            result = await self.pool.generate(request, self.pool.least_loaded())
            return self.renderer.decode(result.token_ids)

        return list(await asyncio.gather(*(one(messages) for messages in conversations)))
