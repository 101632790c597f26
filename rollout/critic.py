"""Critics: what a group reward generates with (rewards.RewardContext), chosen by `reward.critic.backend`.

    "policy"                 PolicyCritic: the policy itself, at the current weight version, on the
                             run's rollout engines (K2's self-critique)
    a model directory        ModelCritic: another Hugging Face model on engines of its own, read from
                             its directory and never updated
    http(s)://host:port/v1   EndpointCritic: any OpenAI-compatible chat completions endpoint

Every critic sends a reward's requests together (the engines batch them; an endpoint gets up to
`reward.critic.max_concurrency` at once) and keeps the wall-clock time during which any of its
requests was in flight, which the loop reports per step as `time_critic_s`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import time
from pathlib import Path

from rollout.engine import GenerationRequest, fit_context
from rollout.rendering import Renderer

# The API key an endpoint critic sends, if its endpoint needs one.
API_KEY_VARIABLE = "K2RL_CRITIC_API_KEY"


class CriticError(RuntimeError):
    """The critic cannot answer (down, too slow, misconfigured); the message names the critic and the cause."""


class Critic:
    """A model to generate with; subclasses say how (`_generate`)."""

    def __init__(self) -> None:
        self._in_flight = 0
        self._busy_since = 0.0
        self._busy_s = 0.0

    async def generate(self, conversations: list[list[dict[str, str]]], max_tokens: int, temperature: float = 0.0) -> list[str]:
        """One reply per conversation (chat messages), in order."""
        if self._in_flight == 0:
            self._busy_since = time.perf_counter()
        self._in_flight += 1
        try:
            return await self._generate(conversations, max_tokens, temperature)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._busy_s += time.perf_counter() - self._busy_since

    async def _generate(self, conversations: list[list[dict[str, str]]], max_tokens: int, temperature: float) -> list[str]:
        raise NotImplementedError

    def take_busy_seconds(self) -> float:
        """Seconds during which a request of this critic was in flight, since the last call."""
        busy, self._busy_s = self._busy_s, 0.0
        return busy

    def close(self) -> None:
        """Release what the critic started (engines of its own); the run's engines are not its to stop."""


class PolicyCritic(Critic):
    """Generates on the run's own engines, with the weights being trained, in the same batches as
    the episodes that are still running."""

    def __init__(self, pool, renderer: Renderer, max_model_len: int):
        super().__init__()
        self.pool, self.renderer, self.max_model_len = pool, renderer, max_model_len
        self._ids = itertools.count()

    async def _generate(self, conversations: list[list[dict[str, str]]], max_tokens: int, temperature: float) -> list[str]:
        async def one(messages: list[dict[str, str]]) -> str:
            prompt = self.renderer.prompt(messages)
            room = min(max_tokens, self.max_model_len - len(prompt))
            if room <= 0:
                raise ValueError(f"a critic prompt of {len(prompt)} tokens leaves no room in max_model_len={self.max_model_len}")
            request = GenerationRequest(f"critic/{next(self._ids)}", tuple(prompt), room, temperature, seed=0 if temperature > 0 else None)
            result = await self.pool.generate(request, self.pool.least_loaded())
            return self.renderer.decode(result.token_ids)

        return list(await asyncio.gather(*(one(messages) for messages in conversations)))


class ModelCritic(PolicyCritic):
    """A separate Hugging Face model on engines of its own (`reward.critic.num_engines`), which read
    the weights from the model directory; no weight sync ever reaches them. Their context is
    `reward.critic.max_model_len`, or the model's own maximum where that is shorter."""

    @classmethod
    def start(cls, model_dir: str, run_config, num_engines: int, max_model_len: int, kv_cache_gib: int) -> ModelCritic:
        """Start the critic's engines (`run_config` gives the dtype, seed and engine settings)."""
        import ray

        from rl.cluster.engine_pool import EnginePool, EngineStartError
        from rl.cluster.placement import resolve_dtype, resolve_layout

        check_model_dir(model_dir)
        run_config = resolve_dtype(run_config)
        max_model_len = fit_context(model_dir, max_model_len)

        class DiskWeightsPool(EnginePool):
            """Engines that read their weights from disk: the run's pool starts empty engines for weight sync."""

            def _start(self, index: int):
                self.spec = dataclasses.replace(self.spec, load_format="auto", sleep_between_rollouts=False)
                return super()._start(index)

        class OwnDevices:
            """Outside the run's placement group: a GPU each where the cluster has them, else a share of the CPUs."""

            engines_sleep = False

            def engine_options(self, index: int) -> dict:
                return {"num_cpus": 0, "num_gpus": 1 if ray.cluster_resources().get("GPU", 0) else 0}

            def engine_cpu_threads(self, index: int) -> int:
                # The threads Ray gives an actor: on CPU the critic judges while the run's engines generate.
                return 0

        rollout = dataclasses.replace(run_config.rollout, num_engines=num_engines, max_model_len=max_model_len,
                                      kv_cache_gib=kv_cache_gib, tensor_parallel_size=1)
        # A run's config arrives resolved for its policy; what is still auto is resolved for the critic's model.
        critic_config = resolve_layout(dataclasses.replace(run_config, rollout=rollout), model_dir)
        try:
            pool = DiskWeightsPool(critic_config, model_dir, OwnDevices())
            pool.wait_ready()
        except EngineStartError as error:
            raise CriticError(f"critic model {model_dir}: {error}") from None
        return cls(pool, Renderer.from_pretrained(model_dir), max_model_len)

    async def _generate(self, conversations: list[list[dict[str, str]]], max_tokens: int, temperature: float) -> list[str]:
        replies = await super()._generate(conversations, max_tokens, temperature)
        # The critic's engines serve nothing else, so their streaming calls can all close here,
        # before the caller's event loop moves on.
        await self.pool.drain()
        return replies

    def close(self) -> None:
        self.pool.shutdown()


class EndpointCritic(Critic):
    """An OpenAI-compatible chat completions endpoint (a `vllm serve`, a hosted model). Each request
    may take `timeout_s`; a failed or late one fails the reward that asked, naming the endpoint."""

    def __init__(self, url: str, model: str, timeout_s: float, max_concurrency: int):
        super().__init__()
        self.url, self.model, self.timeout_s, self.max_concurrency = url.rstrip("/"), model, timeout_s, max_concurrency

    @classmethod
    def connect(cls, url: str, model: str, timeout_s: float, max_concurrency: int) -> EndpointCritic:
        """Check that the endpoint answers (and, with no `model`, take the first it lists), so that an
        unreachable critic stops the run before it starts."""
        import openai

        client = openai.OpenAI(base_url=url, api_key=_api_key(), timeout=timeout_s, max_retries=0)
        try:
            listed = [m.id for m in client.models.list()]
        except openai.OpenAIError as error:
            raise CriticError(f"critic endpoint {url}: {_describe(error, timeout_s)}") from None
        finally:
            client.close()
        if model and model not in listed:
            raise CriticError(f"critic endpoint {url} does not serve model {model!r} (it lists: {', '.join(listed) or 'none'})")
        if not model and not listed:
            raise CriticError(f"critic endpoint {url} lists no model; name one in reward.critic.model")
        return cls(url, model or listed[0], timeout_s, max_concurrency)

    async def _generate(self, conversations: list[list[dict[str, str]]], max_tokens: int, temperature: float) -> list[str]:
        import openai

        limit = asyncio.Semaphore(self.max_concurrency)
        async with openai.AsyncOpenAI(base_url=self.url, api_key=_api_key(), timeout=self.timeout_s, max_retries=0) as client:

            async def one(messages: list[dict[str, str]]) -> str:
                async with limit:
                    try:
                        reply = await client.chat.completions.create(
                            model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature
                        )
                    except openai.OpenAIError as error:
                        raise CriticError(f"critic endpoint {self.url}: {_describe(error, self.timeout_s)}") from None
                return reply.choices[0].message.content or ""

            # The first failure cancels the requests still waiting: one clear reason, no waiting on the rest.
            try:
                async with asyncio.TaskGroup() as group:
                    requests = [group.create_task(one(messages)) for messages in conversations]
            except BaseExceptionGroup as failures:
                raise failures.exceptions[0] from None
        return [request.result() for request in requests]


def check_model_dir(model_dir: str) -> None:
    """A critic model must be a Hugging Face model directory; fail before starting anything if not."""
    if not (Path(model_dir) / "config.json").is_file():
        raise CriticError(f"critic model {model_dir} is not a Hugging Face model directory (no config.json)")


def _api_key() -> str:
    # The client insists on a key; endpoints without authentication ignore it.
    return os.environ.get(API_KEY_VARIABLE, "none")


def _describe(error: Exception, timeout_s: float) -> str:
    import openai

    if isinstance(error, openai.APITimeoutError):
        return f"no answer within reward.critic.timeout_s={timeout_s:g}s"
    if isinstance(error, openai.APIConnectionError):
        return f"unreachable ({error.__cause__ or error})"
    if isinstance(error, openai.APIStatusError):
        return f"answered HTTP {error.status_code} ({error.message})"
    return f"{type(error).__name__}: {error}"


def open_critic(config, pool, renderer: Renderer) -> Critic:
    """The critic that `config.reward.critic` names; `pool` and `renderer` are the run's own (the policy's)."""
    critic = config.reward.critic
    if critic.backend == "policy":
        return PolicyCritic(pool, renderer, config.rollout.max_model_len)
    if critic.backend.startswith(("http://", "https://")):
        return EndpointCritic.connect(critic.backend, critic.model, critic.timeout_s, critic.max_concurrency)
    return ModelCritic.start(critic.backend, config, critic.num_engines, critic.max_model_len, critic.kv_cache_gib)
