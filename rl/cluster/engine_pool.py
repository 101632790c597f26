"""The rollout engines of a run: start, restart, and serve generation requests.

Requests go to the least-loaded engine, and every request of one group's episodes to the same
engine (rollout/manager.py, `RolloutContext.engine_for`), so that the samples of a prompt, and the
turns of an episode, reuse their prefix in that engine's cache. Requests made in the same moment
travel to an engine together, in one streaming call whose results come back as they finish.

An engine that dies (its actor, or the vLLM engine core inside it) is restarted (up to
`rollout.max_engine_restarts` times), brought to the current weight version, and the requests it
held are sent again: an episode re-runs from its last complete state, never lost and never counted
twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace

import ray

from rl.cluster.placement import Placement
from rl.cluster.ray_session import error_summary
from rl.config import RunConfig
from rollout.engine import EngineSpec, GenerationRequest, GenerationResult, RolloutEngine, engine_died

log = logging.getLogger(__name__)


class EngineStartError(RuntimeError):
    """A rollout engine did not come up; the message names the engine and the cause."""


def run_engine_spec(config: RunConfig, model_path: str, sleep_between_rollouts: bool) -> EngineSpec:
    """What every engine of a run is, but its CPU threads (`EnginePool.engine_spec`): it starts
    empty, and weight sync sends version 0 before any use."""
    rollout = config.rollout
    return EngineSpec(
        model_path=model_path,
        dtype=config.model.dtype,
        max_model_len=rollout.max_model_len,
        kv_cache_gib=rollout.kv_cache_gib,
        seed=config.seed,
        enforce_eager=rollout.enforce_eager,
        load_format="dummy",
        sleep_between_rollouts=sleep_between_rollouts,
        tensor_parallel_size=rollout.tensor_parallel_size,
        max_num_seqs=rollout.max_concurrent_episodes,
    )


class EnginePool:
    def __init__(self, config: RunConfig, model_path: str, placement: Placement):
        self.config = config
        self.placement = placement
        self.spec = run_engine_spec(config, model_path, placement.engines_sleep)
        self.restarts = [0] * config.rollout.num_engines
        # Set by the run's wiring: brings a restarted engine to the current weights.
        self.load_weights: Callable[[int], None] = lambda index: None
        # The engines start in the background; `wait_ready` waits for them.
        self.engines = [self._start(index) for index in range(config.rollout.num_engines)]
        self._load = [0] * len(self.engines)
        # Generation runs on this loop only, so that the pool's futures and locks always belong to it.
        self.loop = asyncio.new_event_loop()
        self._queued: dict[int, list[tuple[GenerationRequest, asyncio.Future]]] = {}
        self._streams: set[asyncio.Task] = set()
        self._revive_locks: dict[int, asyncio.Lock] = {}
        # Each engine's share of the current step's token budget (0: none), and the counted tokens each
        # engine has returned in this step: a restarted engine gets what its predecessor left of the share.
        self._budget_share = 0
        self._returned_tokens = [0] * len(self.engines)

    def wait_ready(self) -> None:
        """Wait until every engine has started; one that cannot ends the run, naming it and the cause."""
        try:
            for index, engine in enumerate(self.engines):
                self._wait_ready(index, engine, "failed to start")
        except BaseException:
            self.shutdown()
            raise

    def __len__(self) -> int:
        return len(self.engines)

    def engine_spec(self, index: int) -> EngineSpec:
        return replace(self.spec, cpu_threads=self.placement.engine_cpu_threads(index))

    def _start(self, index: int):
        actor = ray.remote(RolloutEngine).options(**self.placement.engine_options(index))
        return actor.remote(self.engine_spec(index))

    def _wait_ready(self, index: int, engine, failure: str) -> None:
        timeout = self.config.rollout.engine_start_timeout_s
        try:
            ray.get(engine.ready.remote(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise EngineStartError(
                f"rollout engine {index} did not start within rollout.engine_start_timeout_s={timeout:g}s"
            ) from None
        except ray.exceptions.RayError as error:
            raise EngineStartError(f"rollout engine {index} {failure}: {error_summary(error)}") from None

    def node_ids(self) -> list[str]:
        return ray.get([engine.node_id.remote() for engine in self.engines])

    def packed_modules(self) -> dict[str, list[str]]:
        return ray.get(self.engines[0].packed_modules.remote())

    def least_loaded(self) -> int:
        """The engine with the fewest requests in flight (the lowest index among equals)."""
        return min(range(len(self.engines)), key=lambda index: self._load[index])

    async def generate(self, request: GenerationRequest, engine: int) -> GenerationResult:
        """Run `request` on engine `engine`; if that engine dies, on its replacement."""
        while True:
            revive = self._revive_locks.get(engine)
            if revive is not None and revive.locked():
                # The engine is being restarted: its new actor takes requests once it holds the weights.
                async with revive:
                    pass
            handle = self.engines[engine]
            future = asyncio.get_running_loop().create_future()
            queue = self._queued.setdefault(engine, [])
            queue.append((request, future))
            self._load[engine] += 1
            if len(queue) == 1:
                asyncio.get_running_loop().call_soon(self._send, engine)
            try:
                return await future
            except ray.exceptions.RayError as error:
                if not engine_died(error):
                    raise
                await self._revive(engine, handle, error)

    def _send(self, engine: int) -> None:
        batch = self._queued.pop(engine, [])
        if batch:
            stream = asyncio.ensure_future(self._stream(engine, batch))
            self._streams.add(stream)
            stream.add_done_callback(self._streams.discard)

    async def drain(self) -> None:
        """Wait until every streaming call has closed (their results have all been handed out)."""
        while self._streams:
            await asyncio.gather(*self._streams, return_exceptions=True)

    async def _stream(self, engine: int, batch: list[tuple[GenerationRequest, asyncio.Future]]) -> None:
        waiting = {request.request_id: future for request, future in batch}
        counted = {request.request_id for request, _ in batch if request.count_tokens}
        try:
            async for ref in self.engines[engine].generate.remote([request for request, _ in batch]):
                for result in await ref:
                    self._load[engine] -= 1
                    if result.request_id in counted:
                        self._returned_tokens[engine] += len(result.token_ids)
                    future = waiting.pop(result.request_id)
                    if not future.done():  # its episode may have been cancelled
                        future.set_result(result)
        except Exception as error:  # noqa: BLE001 - every waiting request learns what happened
            for future in waiting.values():
                if not future.done():
                    future.set_exception(error)
        finally:
            self._load[engine] -= len(waiting)

    async def _revive(self, index: int, dead, error: BaseException) -> None:
        """Restart engine `index` once, however many of its requests saw it die."""
        lock = self._revive_locks.setdefault(index, asyncio.Lock())
        async with lock:
            if self.engines[index] is dead:
                await asyncio.to_thread(self.restart, index, error)

    def restart(self, index: int, cause: BaseException) -> None:
        """Replace a dead engine and bring it to the current version; the other engines are not involved."""
        self.restarts[index] += 1
        limit = self.config.rollout.max_engine_restarts
        if self.restarts[index] > limit:
            raise EngineStartError(
                f"rollout engine {index} died and rollout.max_engine_restarts={limit} restarts are used up: "
                f"{error_summary(cause)}"
            )
        log.warning("rollout engine %d died (%s); restarting it", index, error_summary(cause))
        ray.kill(self.engines[index])
        self.engines[index] = self._start(index)
        self._wait_ready(index, self.engines[index], "died and could not be restarted")
        self.load_weights(index)
        if self._budget_share:
            # The tokens the dead engine returned stay in the step; those of its requests in flight
            # are lost with it, and the requests start over here.
            ray.get(self.engines[index].start_token_budget.remote(self._budget_share, self._returned_tokens[index]))

    async def start_token_budget(self, budget: int) -> None:
        """Start a step's token budget (rollout.partial.max_tokens_per_step), shared evenly among the
        engines: each stops its counted requests once it has generated its share."""
        self._budget_share = -(-budget // len(self.engines))
        self._returned_tokens = [0] * len(self.engines)
        await asyncio.gather(*(engine.start_token_budget.remote(self._budget_share) for engine in self.engines))

    def sequence_logprobs(self, index: int, token_ids: list[int]) -> list[float]:
        return ray.get(self.engines[index].sequence_logprobs.remote(token_ids))

    def sleep(self) -> None:
        ray.get([engine.sleep.remote() for engine in self.engines])

    def shutdown(self) -> None:
        """Stop each engine's engine core, then the actors."""
        try:
            ray.get([engine.shutdown.remote() for engine in self.engines], timeout=30)
        except Exception:  # noqa: BLE001 - a dead or stuck engine is killed below regardless
            pass
        finally:  # a Ctrl-C during the wait too
            for engine in self.engines:
                ray.kill(engine)
            self.engines = []
            if hasattr(self, "loop"):
                self.loop.close()
