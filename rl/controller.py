"""The controller: the Ray driver that owns the loop, the data and the metrics.

One iteration (synchronous, as in K2's colocated/disaggregated controller):

    sample prompts -> rollout K per prompt on the vLLM engines -> rewards with budget
    penalties -> group baselines -> train on the sharded trainer ranks
    -> checkpoint engine: weights into the engines in place (version + 1) -> metrics

It moves token ids and numbers between processes, never weights.
"""

from __future__ import annotations

import itertools
import json
import logging
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm import tqdm
from transformers import AutoConfig

from rewards import RewardScorer, get_reward
from rl.bootstrap import ensure_default_policy
from rl.checkpoint_engine import BucketPlan, WeightUpdate, mark_reader_failed, plan_buckets
from rl.config import ConfigError, RunConfig
from rl.data import PromptSampler, load_eval_tasks
from rl.evaluation import accuracy
from rl.loss import group_advantages
from rl.metrics import MetricsLogger
from rl.parallel import check_layout
from rl.records import RewardResult, Task, Trajectory
from rl.trainer import TrainerWorker
from rollout.engine import EngineSpec, RolloutEngine, SamplingSpec


log = logging.getLogger(__name__)


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


def checkpoint_workers(trainer_nodes: list[str], engine_nodes: list[str]) -> dict[int, tuple[int, ...]]:
    """Trainer rank -> the engines it serves: the first rank of each node serves that node's engines."""
    first_rank: dict[str, int] = {}
    for rank, node in enumerate(trainer_nodes):
        first_rank.setdefault(node, rank)
    workers: dict[int, tuple[int, ...]] = {}
    for index, node in enumerate(engine_nodes):
        if node not in first_rank:
            raise ConfigError(
                f"rollout engine {index} runs on node {node[:12]}, where no trainer rank runs: the checkpoint "
                "engine serves engines from a trainer rank on their own node"
            )
        workers[first_rank[node]] = workers.get(first_rank[node], ()) + (index,)
    return workers


class Cluster:
    """The Ray actors of one run: rollout engines, trainer ranks, and the checkpoint engine between them.

    The checkpoint is read from disk once, by the trainer (rank 0 reads it and the other ranks get
    their shards from it); the engines start with dummy weights and receive version 0 from the
    checkpoint engine before they generate anything.
    """

    def __init__(self, config: RunConfig, model_path: str):
        self.config = config
        self.engines: list = []
        self.trainers: list = []
        self.weight_version = 0
        self.engine_restarts = [0] * config.rollout.num_engines
        self._update_ids = itertools.count(1)
        self._plan: BucketPlan | None = None
        self._device_bundles = None
        try:
            self._start(model_path)
        except BaseException:
            self.shutdown()
            raise

    def _start(self, model_path: str) -> None:
        config = self.config
        world = config.trainer.data_parallel_size * config.trainer.tensor_parallel_size
        # A mesh that cannot split the model fails here, before any process starts.
        check_layout(config.trainer, world, AutoConfig.from_pretrained(model_path))
        # On GPU every actor takes devices of its own (disaggregated), or engine i and trainer rank
        # i share device i, half each (colocated); on CPU they share the cores.
        gpus = int(ray.cluster_resources().get("GPU", 0))
        colocated = config.rollout.placement == "colocated"
        rollout_tp = config.rollout.tensor_parallel_size
        if rollout_tp > 1 and not gpus:
            raise ConfigError(f"rollout.tensor_parallel_size={rollout_tp} needs GPUs; the Ray cluster has none")
        if colocated and gpus and (config.rollout.num_engines != world or rollout_tp != 1):
            raise ConfigError(
                f"rollout.placement=colocated on GPU pairs one engine with each trainer rank: it needs "
                f"rollout.num_engines = {world} trainer ranks and rollout.tensor_parallel_size = 1"
            )
        engine_gpus = config.rollout.num_engines * rollout_tp
        needed = world if colocated else engine_gpus + world
        if gpus and gpus < needed:
            raise ConfigError(
                f"{needed} GPUs needed for rollout.num_engines={config.rollout.num_engines} x "
                f"rollout.tensor_parallel_size={rollout_tp} and {world} trainer ranks "
                f"(rollout.placement={config.rollout.placement}), the Ray cluster has {gpus}"
            )
        if colocated and gpus:
            self._device_bundles = ray.util.placement_group([{"GPU": 1}] * world, strategy="PACK")
            ray.get(self._device_bundles.ready())
        self._gpus_per_actor = (0.5 if colocated else 1) if gpus else 0
        self._engine_spec = EngineSpec(
            model_path=model_path,
            dtype=config.model.dtype,
            max_model_len=config.rollout.max_model_len,
            kv_cache_gib=config.rollout.kv_cache_gib,
            seed=config.seed,
            enforce_eager=config.rollout.enforce_eager,
            load_format="dummy",
            sleep_between_rollouts=colocated and gpus > 0,
            tensor_parallel_size=rollout_tp,
        )
        self._engine_actor = ray.remote(num_cpus=0, num_gpus=self._gpus_per_actor * rollout_tp)(RolloutEngine)
        self.engines = [self._start_engine(index) for index in range(config.rollout.num_engines)]
        for index, engine in enumerate(self.engines):
            self._wait_ready(index, engine, "failed to start")
        trainer_actor = ray.remote(num_cpus=0, num_gpus=self._gpus_per_actor)(TrainerWorker)
        port = _free_port()
        self.trainers = [
            trainer_actor.options(**self._on_device(rank)).remote(
                rank, world, port, model_path, config.model.dtype, config.trainer, config.seed
            )
            for rank in range(world)
        ]
        ray.get([trainer.__ray_ready__.remote() for trainer in self.trainers])
        layout = ray.get(self.trainers[0].weight_layout.remote())
        packed = ray.get(self.engines[0].packed_modules.remote())
        self._plan = plan_buckets(
            layout,
            packed,
            int(config.checkpoint.bucket_mb * 2**20),
            num_readers=len(self.engines),
            block_name=f"k2rl-ckpt-{uuid.uuid4().hex[:12]}",
        )
        self._open_checkpoint_engine()
        self._push_weights(0, tuple(range(len(self.engines))))

    def _open_checkpoint_engine(self) -> None:
        """One checkpoint-engine worker per node: the node's first trainer rank serves its engines."""
        trainer_nodes = ray.get([trainer.node_id.remote() for trainer in self.trainers])
        engine_nodes = ray.get([engine.node_id.remote() for engine in self.engines])
        workers = checkpoint_workers(trainer_nodes, engine_nodes)
        ray.get([self.trainers[rank].open_checkpoint_engine.remote(self._plan, local) for rank, local in workers.items()])

    def _on_device(self, index: int) -> dict:
        """Actor options that put a colocated engine or trainer rank `index` on device `index`."""
        if self._device_bundles is None:
            return {}
        strategy = PlacementGroupSchedulingStrategy(self._device_bundles, placement_group_bundle_index=index)
        return {"scheduling_strategy": strategy}

    def _start_engine(self, index: int):
        return self._engine_actor.options(**self._on_device(index)).remote(self._engine_spec)

    def _wait_ready(self, index: int, engine, failure: str) -> None:
        timeout = self.config.rollout.engine_start_timeout_s
        try:
            ray.get(engine.ready.remote(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise EngineStartError(
                f"rollout engine {index} did not start within rollout.engine_start_timeout_s={timeout:g}s"
            ) from None
        except ray.exceptions.RayError as error:
            raise EngineStartError(f"rollout engine {index} {failure}: {_error_summary(error)}") from None

    def _push_weights(self, version: int, readers: tuple[int, ...]) -> None:
        """One checkpoint-engine update: every trainer rank gathers, rank 0 writes, `readers` load.
        An engine that dies on the way is restarted and then given `version` alone."""
        update = WeightUpdate(self._plan, next(self._update_ids), version, readers, self.config.checkpoint.timeout_s)
        colocated = self._engine_spec.sleep_between_rollouts
        if colocated:
            # The device holds the trainer's parameters and the engines' weights during the update.
            ray.get([trainer.offload.remote(parameters=False) for trainer in self.trainers])
            ray.get([self.engines[index].wake_up.remote(("weights",)) for index in readers])
        gathers = [trainer.broadcast_weights.remote(update) for trainer in self.trainers]
        loads = {self.engines[index].receive_update.remote(update, index): index for index in readers}
        died: dict[int, BaseException] = {}
        pending = list(loads)
        while pending:  # in completion order: a dead engine is noticed while the others still wait
            (future,), pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(future)
            except ray.exceptions.RayActorError as error:
                mark_reader_failed(self._plan, loads[future], update.update_id)  # the writer stops waiting
                died[loads[future]] = error
        ray.get(gathers)
        if colocated:
            # The trainer's memory goes to the host before the engines' KV caches come back.
            ray.get([trainer.offload.remote() for trainer in self.trainers])
            ray.get([self.engines[index].wake_up.remote(("kv_cache",)) for index in readers if index not in died])
        for index, error in died.items():
            self._restart_engine(index, error, version)

    def generate(self, tasks: list[Task], sampling: list[SamplingSpec]) -> list[Trajectory]:
        """Spread tasks over the engines in contiguous chunks; results come back in task order.

        A chunk whose engine died is generated again, once the engine is back, by that engine:
        the other chunks are kept, so no task is lost or counted twice.
        """
        count = len(self.engines)
        bounds = [len(tasks) * i // count for i in range(count + 1)]
        chunks = {index: (lo, hi) for index, (lo, hi) in enumerate(zip(bounds, bounds[1:])) if hi > lo}
        results: dict[int, list[Trajectory]] = {}
        while chunks:
            pending = {
                self.engines[index].generate.remote(tasks[lo:hi], sampling[lo:hi]): index
                for index, (lo, hi) in chunks.items()
            }
            for future, index in pending.items():
                try:
                    results[index] = ray.get(future)
                    del chunks[index]
                except ray.exceptions.RayActorError as error:
                    self._restart_engine(index, error, self.weight_version)
        return [completion for index in sorted(results) for completion in results[index]]

    def _restart_engine(self, index: int, cause: BaseException, version: int) -> None:
        """Replace a dead engine and bring it to `version`; the other engines are not involved."""
        self.engine_restarts[index] += 1
        limit = self.config.rollout.max_engine_restarts
        if self.engine_restarts[index] > limit:
            raise EngineStartError(
                f"rollout engine {index} died and rollout.max_engine_restarts={limit} restarts are used up: "
                f"{_error_summary(cause)}"
            )
        log.warning("rollout engine %d died (%s); restarting it", index, _error_summary(cause))
        ray.kill(self.engines[index])
        self.engines[index] = self._start_engine(index)
        self._wait_ready(index, self.engines[index], "died and could not be restarted")
        self._push_weights(version, (index,))

    def train(self, trajectories: list[Trajectory], advantages: list[float]) -> dict[str, float]:
        """Each data-parallel group gets its shard; the ranks of one tensor-parallel group share it."""
        if self._engine_spec.sleep_between_rollouts:
            # Colocated on GPU: the engines give the devices to the trainer (which takes its
            # offloaded state back in `train`) until the next update.
            ray.get([engine.sleep.remote() for engine in self.engines])
        tp = self.config.trainer.tensor_parallel_size
        dp = len(self.trainers) // tp
        shard = len(trajectories) // dp
        results = ray.get(
            [
                trainer.train.remote(
                    trajectories[(rank // tp) * shard : (rank // tp + 1) * shard],
                    advantages[(rank // tp) * shard : (rank // tp + 1) * shard],
                    self.config.rollout.temperature,
                )
                for rank, trainer in enumerate(self.trainers)
            ]
        )
        leaders = results[::tp]  # one rank per data-parallel group
        tokens = sum(r["response_tokens"] for r in leaders)
        merged = {
            "loss": sum(r["loss"] for r in leaders) / dp,
            "grad_norm": results[0]["grad_norm"],
            "log_ratio_abs_mean": sum(r["log_ratio_abs_mean"] for r in leaders) / dp,
            "logprob_diff_mean": sum(r["logprob_diff_sum"] for r in leaders) / max(tokens, 1),
        }
        if "max_attention_logit" in results[0]:
            merged["max_attention_logit"] = results[0]["max_attention_logit"]
        return merged

    def sync_weights(self) -> int:
        """Version + 1 from the trainer into every engine, in place."""
        self._push_weights(self.weight_version + 1, tuple(range(len(self.engines))))
        self.weight_version += 1
        return self.weight_version

    def trainer_logprobs(self, token_ids: list[int]) -> list[float]:
        """The trainer's logprobs of a fixed sequence (a collective: every rank takes part)."""
        return ray.get([trainer.sequence_logprobs.remote(token_ids) for trainer in self.trainers])[0]

    def save(self, out_dir: Path) -> None:
        ray.get([trainer.save.remote(str(out_dir)) for trainer in self.trainers])

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
        if self._device_bundles is not None:
            ray.util.remove_placement_group(self._device_bundles)
            self._device_bundles = None


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
