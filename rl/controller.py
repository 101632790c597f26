"""The controller: the Ray driver that owns the loop, the data and the metrics.

One iteration (synchronous, as in K2's colocated/disaggregated controller):

    sample prompts -> rollout K per prompt on the vLLM engines -> rewards with budget
    penalties -> group baselines -> train on the data-parallel trainer ranks
    -> publish weights into the engines in place (version + 1) -> metrics

It moves token ids and numbers between processes, never weights.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray
from tqdm import tqdm

from rewards import RewardScorer, get_reward
from rl.bootstrap import ensure_default_policy
from rl.config import ConfigError, RunConfig
from rl.data import PromptSampler, load_eval_tasks
from rl.evaluation import accuracy
from rl.loss import group_advantages
from rl.metrics import MetricsLogger
from rl.records import RewardResult, Task, Trajectory
from rl.trainer import TrainerWorker
from rollout.engine import EngineSpec, RolloutEngine, SamplingSpec


class EngineStartError(RuntimeError):
    """A rollout engine did not come up; the message names the engine and the cause."""


@dataclass
class RunSummary:
    run_dir: Path
    initial_eval_accuracy: float
    final_eval_accuracy: float
    seconds: float
    weight_version: int


def init_local_ray(verbose: bool = False) -> None:
    """Start a single-node Ray cluster for one run; `verbose` shows Ray and vLLM worker logs."""
    ray.init(
        # Single-node runs stay on loopback; a cluster job connects with `ray start` instead.
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.ERROR,
        object_store_memory=256 * 1024**2,
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
    )


def resolve_model_path(config: RunConfig) -> str:
    if not config.model.path:
        return str(ensure_default_policy())
    path = Path(config.model.path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path: {path} is not a Hugging Face model directory (no config.json)")
    return str(path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _error_summary(error: BaseException) -> str:
    """The last line of a remote error's text: the exception itself, without the traceback."""
    cause = getattr(error, "cause", None) or error
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(cause).__name__


class Cluster:
    """The Ray actors of one run: rollout engines and trainer ranks."""

    def __init__(self, config: RunConfig, model_path: str):
        self.config = config
        self.engines: list = []
        self.trainers: list = []
        self.weight_version = 0
        try:
            self._start(model_path)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, model_path: str) -> None:
        config = self.config
        # On GPU every actor takes one device (disaggregated mode); on CPU they share the cores.
        gpus = int(ray.cluster_resources().get("GPU", 0))
        per_actor_gpus = 1 if gpus else 0
        needed = config.rollout.num_engines + config.trainer.data_parallel_size
        if gpus and gpus < needed:
            raise ConfigError(
                f"rollout.num_engines + trainer.data_parallel_size = {needed} GPUs needed, the Ray cluster has {gpus}"
            )
        spec = EngineSpec(
            model_path=model_path,
            dtype=config.model.dtype,
            max_model_len=config.rollout.max_model_len,
            kv_cache_gib=config.rollout.kv_cache_gib,
            seed=config.seed,
            enforce_eager=config.rollout.enforce_eager,
        )
        # Actors ask for no CPU slots: engines and trainers take turns on the same cores.
        engine_actor = ray.remote(num_cpus=0, num_gpus=per_actor_gpus)(RolloutEngine)
        self.engines = [engine_actor.remote(spec) for _ in range(config.rollout.num_engines)]
        for index, engine in enumerate(self.engines):
            try:
                ray.get(engine.ready.remote(), timeout=config.rollout.engine_start_timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise EngineStartError(
                    f"rollout engine {index} did not start within rollout.engine_start_timeout_s="
                    f"{config.rollout.engine_start_timeout_s:g}s"
                ) from None
            except ray.exceptions.RayError as error:
                raise EngineStartError(f"rollout engine {index} failed to start: {_error_summary(error)}") from None
        trainer_actor = ray.remote(num_cpus=0, num_gpus=per_actor_gpus)(TrainerWorker)
        world, port = config.trainer.data_parallel_size, _free_port()
        self.trainers = [
            trainer_actor.remote(rank, world, port, model_path, config.model.dtype, config.trainer, config.seed)
            for rank in range(world)
        ]
        ray.get([trainer.__ray_ready__.remote() for trainer in self.trainers])

    def generate(self, tasks: list[Task], sampling: list[SamplingSpec]) -> list[Trajectory]:
        """Spread tasks over the engines in contiguous chunks; results come back in task order."""
        count = len(self.engines)
        bounds = [len(tasks) * i // count for i in range(count + 1)]
        futures = [
            engine.generate.remote(tasks[lo:hi], sampling[lo:hi])
            for engine, lo, hi in zip(self.engines, bounds, bounds[1:])
            if hi > lo
        ]
        return [completion for chunk in ray.get(futures) for completion in chunk]

    def train(self, trajectories: list[Trajectory], advantages: list[float]) -> dict[str, float]:
        world = len(self.trainers)
        shard = len(trajectories) // world
        results = ray.get(
            [
                trainer.train.remote(
                    trajectories[rank * shard : (rank + 1) * shard],
                    advantages[rank * shard : (rank + 1) * shard],
                    self.config.rollout.temperature,
                )
                for rank, trainer in enumerate(self.trainers)
            ]
        )
        tokens = sum(r["response_tokens"] for r in results)
        return {
            "loss": sum(r["loss"] for r in results) / world,
            "grad_norm": results[0]["grad_norm"],
            "log_ratio_abs_mean": sum(r["log_ratio_abs_mean"] for r in results) / world,
            "logprob_diff_mean": sum(r["logprob_diff_sum"] for r in results) / max(tokens, 1),
        }

    def sync_weights(self) -> int:
        """Trainer rank 0 publishes version + 1; every engine loads it in place."""
        manifest = ray.get(self.trainers[0].publish_weights.remote(self.weight_version + 1))
        versions = ray.get([engine.load_weights.remote(manifest) for engine in self.engines])
        self.weight_version = versions[0]
        return self.weight_version

    def save(self, out_dir: Path) -> None:
        ray.get(self.trainers[0].save.remote(str(out_dir)))

    def shutdown(self) -> None:
        """Release the trainers' shared memory and process group, then stop every actor.

        A trainer stuck in a collective (a peer died, Ctrl-C) cannot answer, so the
        polite request is bounded and the actors are killed regardless.
        """
        try:
            ray.get([trainer.shutdown.remote() for trainer in self.trainers], timeout=30)
        except Exception:  # noqa: BLE001 - cleanup must reach the kills below
            pass
        for actor in self.engines + self.trainers:
            ray.kill(actor)
        self.engines, self.trainers = [], []


class Controller:
    def __init__(self, config: RunConfig, run_dir: Path):
        self.config = config
        self.run_dir = run_dir
        self.eval_tasks = load_eval_tasks(config.data.eval_path, config.data.eval_size)
        self.sampler = PromptSampler(config.data.train_path, config.seed, self.eval_tasks)
        # An unknown reward name fails here, before any process starts.
        for name in self.sampler.reward_names() | {task.reward for task in self.eval_tasks}:
            get_reward(name)

    def _budget(self, task: Task) -> int:
        rollout = self.config.rollout
        return rollout.token_budgets.get(task.task_type, rollout.default_token_budget)

    def evaluate(self, cluster: Cluster, scorer: RewardScorer) -> float:
        """Greedy accuracy on the held-out tasks; a response cut at its budget counts as wrong."""
        sampling = [SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_tokens=self._budget(t)) for t in self.eval_tasks]
        return accuracy(self._score(scorer, cluster.generate(self.eval_tasks, sampling)))

    def _score(self, scorer: RewardScorer, trajectories: list[Trajectory]) -> list[RewardResult]:
        """Each response's reward; one cut at its token budget gets the budget penalty instead."""
        items = [(t.task, t.response_text, t.truncated) for t in trajectories]
        return scorer.score(items, self.config.reward.budget_penalty)

    def run(self, model_path: str, on_step: Callable[[int, Cluster], None] | None = None) -> RunSummary:
        """Run every iteration; `on_step(step, cluster)` is called after each weight update."""
        config = self.config
        start = time.perf_counter()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        metrics = MetricsLogger(self.run_dir)
        scorer = RewardScorer(config.reward.num_workers)
        cluster = None
        try:
            cluster = Cluster(config, model_path)
            initial = self.evaluate(cluster, scorer)
            metrics.log({"step": 0, "weight_version": 0, "eval_accuracy": initial})
            final = initial
            progress = tqdm(range(1, config.steps + 1), desc="k2rl train", unit="step")
            for step in progress:
                row = self._iteration(step, cluster, scorer)
                if step % config.data.eval_every == 0 or step == config.steps:
                    eval_start = time.perf_counter()
                    final = row["eval_accuracy"] = self.evaluate(cluster, scorer)
                    row["time_eval_s"] = time.perf_counter() - eval_start
                metrics.log(row)
                if on_step is not None:
                    on_step(step, cluster)
                progress.set_postfix(reward=f"{row['reward_mean']:.3f}", eval=f"{final:.3f}")
            cluster.save(self.run_dir / "final")
            return RunSummary(self.run_dir, initial, final, time.perf_counter() - start, cluster.weight_version)
        finally:
            scorer.close()
            metrics.close()
            if cluster is not None:
                cluster.shutdown()

    def _iteration(self, step: int, cluster: Cluster, scorer: RewardScorer) -> dict:
        config = self.config
        tasks = self.sampler.sample(config.data.prompts_per_step)
        sampling = [
            SamplingSpec(config.rollout.n_samples, config.rollout.temperature, config.rollout.top_p, self._budget(t))
            for t in tasks
        ]

        started = time.perf_counter()
        trajectories = cluster.generate(tasks, sampling)
        rollout_done = time.perf_counter()

        results = self._score(scorer, trajectories)
        rewards = [r.score for r in results]
        # Trajectories come back task by task, n_samples each: a group is a run of n_samples.
        groups = [index // config.rollout.n_samples for index in range(len(trajectories))]
        advantages = group_advantages(rewards, groups)
        reward_done = time.perf_counter()

        train_metrics = cluster.train(trajectories, advantages)
        train_done = time.perf_counter()

        version = cluster.sync_weights()
        sync_done = time.perf_counter()

        reasons: dict[str, int] = {}
        for result in results:
            # "reward_error: ValueError: ..." counts as "reward_error".
            kind = result.reason.split(":")[0]
            reasons[kind] = reasons.get(kind, 0) + 1
        return {
            "step": step,
            "reward_mean": sum(rewards) / len(rewards),
            "response_len_mean": sum(len(t.response_ids) for t in trajectories) / len(trajectories),
            "truncated_frac": sum(t.truncated for t in trajectories) / len(trajectories),
            **train_metrics,
            "weight_version": version,
            "rollout_weight_version": trajectories[0].weight_version,
            "time_rollout_s": rollout_done - started,
            "time_reward_s": reward_done - rollout_done,
            "time_train_s": train_done - reward_done,
            "time_weight_sync_s": sync_done - train_done,
            "reward_reasons": reasons,
        }
