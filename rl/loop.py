"""The RL loop: the Ray driver that owns the iterations, the data and the metrics.

One iteration (synchronous, as in K2's controller):

    sample prompts -> rollout: K episodes per prompt on the engines, each scored as it ends
    -> group baselines -> train on the sharded trainer ranks -> weight sync (version + 1)
    -> metrics, and a run checkpoint every `checkpoint.every` steps

It moves token ids and numbers between processes, never weights.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from rewards import RewardScorer, check_reward_spec, get_reward
from rl import stop_signals
from rl.cluster.placement import resolve_dtype, resolve_layout
from rl.cluster.workers import Workers
from rl.config import ConfigError, RunConfig
from rl.critique import CRITIQUE_TASK_TYPE, CriticRefinement
from rl.data import PromptSampler, load_eval_tasks, load_train_pool
from rl.data.curriculum import Curriculum, SuccessRates
from rl.data.ptx import PTXData
from rl.evaluation import accuracy
from rewards.length import LengthReward
from rl.metrics import MetricsLogger, read_metrics
from rl.records import EpisodeStatus, Task, TrainSample, Trajectory
from rl.run_checkpoint import (
    CheckpointError,
    LoopState,
    RunCheckpoints,
    driver_rng_state,
    model_fingerprint,
    restore_driver_rng,
)
from rl.schedule import Schedule
from rl.trainer.losses import get_loss
from rollout import environments
from rollout.manager import RolloutManager
from rollout.rendering import Renderer

log = logging.getLogger("k2rl")


class RunFinished(Exception):
    """A resumed run that already ran all its steps: nothing is left to do."""


class FailureLimit(RuntimeError):
    """User code failed more often than its config key allows; the message names the key."""


class RewardErrorLimit(FailureLimit):
    """Rewards raised on more responses than `reward.max_error_frac` allows."""


class EnvironmentErrorLimit(FailureLimit):
    """Environments failed in more episodes than `rollout.max_environment_error_frac` allows."""


@dataclass
class RunSummary:
    run_dir: Path
    initial_eval_accuracy: float | None
    final_eval_accuracy: float | None
    seconds: float
    weight_version: int
    # Set when a signal ended the run early, after its checkpoint.
    stopped_at: int | None = None

    def completed(self) -> RunSummary:
        """The summary of a run that went to its last step; a run that a stop signal ended early
        raises KeyboardInterrupt, for callers that need every step (the benches)."""
        if self.stopped_at is not None:
            raise KeyboardInterrupt
        return self


class Controller:
    def __init__(self, config: RunConfig, run_dir: Path):
        self.config = config
        self.run_dir = run_dir
        data = config.data
        kinds = tuple(data.arithmetic_kinds)
        self.eval_tasks = self._with_env(load_eval_tasks(data.eval_path, data.columns, data.eval_size, kinds))
        self.sampler = PromptSampler(
            load_train_pool(data.train_path, data.columns), config.seed, self.eval_tasks,
            curriculum=Curriculum(data.curriculum.steps, data.curriculum.start_fraction) if data.curriculum.steps else None,
            success_rates=SuccessRates(data.prioritized.floor, data.prioritized.smoothing) if data.prioritized.enabled else None,
            hard_fraction=data.arithmetic_hard_fraction, kinds=kinds,
        )
        # An unknown reward or environment fails here, before any process starts, and so does a
        # held-out task that its reward could not score.
        for name in self.sampler.reward_names() | {task.reward for task in self.eval_tasks if task.reward}:
            get_reward(name)
        for task in self.eval_tasks:
            check_reward_spec(task)
        self.critique = CriticRefinement(config, run_dir)
        self.critique.check(self._with_env(self.sampler.tasks()) + self.eval_tasks)
        for env_id, kwargs in {(t.env, json.dumps(t.env_kwargs, sort_keys=True)) for t in self._with_env(self.sampler.tasks()) + self.eval_tasks if t.env}:
            environments.check(env_id, json.loads(kwargs))
        self.temperature = Schedule.parse(config.rollout.temperature, "rollout.temperature")
        self.lr = config.trainer.lr_schedule()
        self.length_reward = LengthReward(config.reward.length.weight, config.reward.length.warmup_steps)
        self.loss = get_loss(config.trainer.loss)(config.trainer.loss_settings())
        if config.rollout.n_samples < 2 and not any(self.loss.advantages([0.0, 1.0], ["a", "b"])):
            raise ConfigError(
                f"rollout.n_samples must be at least 2 with trainer.loss {config.trainer.loss}: its advantages compare "
                f"the responses to one prompt, so a single response per prompt learns nothing"
            )
        self.checkpoints = RunCheckpoints(run_dir, config.checkpoint.keep)
        self.ptx: PTXData | None = None
        self.resume_from: tuple[Path, LoopState] | None = None
        self._prepared = False
        self.version = 0
        self.reward_errors = self.responses_scored = 0
        self.environment_errors = self.episodes_played = 0
        self._stop_signal: int | None = None

    def prepare(self, model_path: str, resume: bool = False) -> None:
        """What can fail before any process starts: the run directory, the PTX data, and (`resume`)
        the latest usable checkpoint, checked against the model. `run` calls it when nobody did."""
        config = self.config
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"run directory {self.run_dir}: cannot create it ({error.strerror}: {error.filename})") from None
        if config.trainer.ptx.path:
            renderer = Renderer.from_pretrained(model_path, config.model.prompt_format)
            self.ptx = PTXData(config.trainer.ptx.path, renderer, config.rollout.max_model_len,
                               config.trainer.ptx.eval_size, config.seed)
        if resume:
            self._check_steps_left()
            path, state = self.checkpoints.latest()
            if state.model_fingerprint != model_fingerprint(model_path):
                raise CheckpointError(
                    f"checkpoint {path} was written for a different model (its parameter names or shapes differ from model.path's)"
                )
            self.resume_from = path, state
        self._prepared = True

    def _check_steps_left(self) -> None:
        """A resume goes on from the latest checkpoint, dropping the metrics and final weights of the
        steps after it: refuse one whose `steps` would drop steps that the run finished, and say when
        it finished them all (a rerun job's resume is then done at once)."""
        logged = (self.run_dir / "metrics.jsonl").is_file()
        ran = max((row["step"] for row in read_metrics(self.run_dir)), default=0) if logged else 0
        steps = self.config.steps
        if ran > steps:
            dropped = f"step {ran}" if ran == steps + 1 else f"steps {steps + 1}-{ran}"
            raise CheckpointError(
                f"--resume with steps={steps} would throw away {dropped}, which {self.run_dir} already ran; pass steps={ran} or more"
            )
        if ran == steps and (self.run_dir / "final").is_dir():
            raise RunFinished(f"{self.run_dir} already ran its {steps} steps (final weights in {self.run_dir / 'final'}); "
                              f"pass steps=N with N > {steps} to train further")

    def run(self, model_path: str, on_step: Callable[[int, Workers], None] | None = None,
            workers: Workers | None = None) -> RunSummary:
        """Every iteration from the start, or from the checkpoint chosen by `prepare`;
        `on_step(step, workers)` is called after each weight update. Given `workers` (started for
        the same model, mesh and engines), the run starts their trainer from the model again (or
        from the checkpoint) and leaves them running."""
        config = self.config = resolve_layout(resolve_dtype(self.config), model_path)
        started = time.perf_counter()
        if not self._prepared:
            self.prepare(model_path)
        resume = self.resume_from is not None
        (self.run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
        handler = _log_to(self.run_dir / "train.log")
        scorer = RewardScorer(config.reward.num_workers)
        own_workers = workers is None
        rollout: RolloutManager | None = None
        metrics: MetricsLogger | None = None
        fingerprint = model_fingerprint(model_path)
        previous_handlers = stop_signals.install(self._on_signal, (signal.SIGINT, signal.SIGTERM))
        try:
            if own_workers:
                workers = Workers.start(config, model_path)
            else:
                workers.serve(config)
                if not resume:
                    workers.trainers.reset(config.seed)
            log.info("workers started in %.1f s", time.perf_counter() - started)
            rollout = RolloutManager(config, workers.engines, Renderer.from_pretrained(model_path, config.model.prompt_format), scorer)
            first_step = self._restore(workers, rollout, *self.resume_from) + 1 if resume else 1
            metrics = MetricsLogger(self.run_dir, resumed_at=first_step - 1 if resume else None)
            workers.weight_sync.push(self.version)
            self.critique.prepare_heldout(rollout, self.eval_tasks)
            # The objects of the imports and the start (tokenizer, tasks, the rollout layer) leave the
            # garbage collector's view for the run: each full collection otherwise walked them all,
            # a quarter of a second in the middle of a step or an evaluation, seven times a run.
            gc.collect()
            gc.freeze()
            initial = final = None
            if resume:
                accuracies = [row["eval_accuracy"] for row in metrics.rows if "eval_accuracy" in row]
                initial, final = (accuracies[0], accuracies[-1]) if accuracies else (None, None)
            else:
                eval_started = time.perf_counter()
                initial = final = self._evaluate(rollout)
                metrics.log({"step": 0, "weight_version": 0, "eval_accuracy": initial, **self.critique.evaluate(rollout),
                             **self._ptx_eval(workers), "time_eval_s": time.perf_counter() - eval_started})
            progress = tqdm(range(first_step, config.steps + 1), desc="k2rl train", unit="step", initial=first_step - 1, total=config.steps)
            for step in progress:
                row = self.iteration(step, workers, rollout)
                if step % config.data.eval_every == 0 or step == config.steps:
                    eval_started = time.perf_counter()
                    final = row["eval_accuracy"] = self._evaluate(rollout)
                    row.update(self.critique.evaluate(rollout))
                    row.update(self._ptx_eval(workers))
                    row["time_eval_s"] = time.perf_counter() - eval_started
                metrics.log(row)
                if on_step is not None:
                    on_step(step, workers)
                progress.set_postfix(reward=f"{row['reward_mean']:.3f}", eval=f"{final:.3f}" if final is not None else "-")
                due = config.checkpoint.every and step % config.checkpoint.every == 0
                if due or self._stop_signal is not None:
                    self._checkpoint(step, workers, rollout, fingerprint)
                # A stop during the last step lets the run finish: nothing is left to resume.
                if self._stop_signal is not None and step < config.steps:
                    log.warning("stopped by %s after step %d; resume with --resume %s", signal.Signals(self._stop_signal).name, step, self.run_dir)
                    return RunSummary(self.run_dir, initial, final, time.perf_counter() - started, self.version, stopped_at=step)
            workers.trainers.save_model(str(self.run_dir / "final"))
            return RunSummary(self.run_dir, initial, final, time.perf_counter() - started, self.version)
        finally:
            # Whatever the run leaves behind can be collected again (a program may run several).
            gc.unfreeze()
            stop_signals.restore(previous_handlers)
            if rollout is not None:
                rollout.close()
            scorer.close()
            if own_workers and workers is not None:
                workers.shutdown()
            if metrics is not None:
                metrics.close()
            _stop_logging_to(handler)

    def iteration(self, step: int, workers: Workers, rollout: RolloutManager) -> dict:
        config = self.config
        started = time.perf_counter()
        temperature, lr = self.temperature.at(step - 1), self.lr.at(step - 1)
        critic_tasks = self.critique.critic_task_count(config.data.prompts_per_step)
        tasks = self.critique.step_tasks(self._with_env(self.sampler.sample(config.data.prompts_per_step - critic_tasks)), critic_tasks)
        step_rollout = rollout.collect(tasks, step, temperature, self.version)
        trajectories = step_rollout.trajectories
        self._count_failures(trajectories)
        scored = [t for t in trajectories if t.trainable]
        sampled = [t for t in scored if t.task.task_type != CRITIQUE_TASK_TYPE]
        self.sampler.update([t.task for t in sampled], [float(t.reward.score >= 1.0) for t in sampled])
        self.critique.observe(step_rollout.groups, rollout.context.renderer, config.rollout.max_model_len)
        length_rewards = self._length_rewards(scored, step)
        samples = self.training_samples(trajectories, length_rewards)
        rollout_done = time.perf_counter()

        train_metrics = {}
        if samples:
            mixes_ptx = self.ptx and config.trainer.ptx.coef > 0
            ptx = self.ptx.sample(max(1, round(config.trainer.ptx.share * len(samples)))) if mixes_ptx else []
            batch, skipped_units = self._without_zero_gradients(samples)
            train_metrics = workers.trainers.train(batch, self.version, lr, ptx, config.trainer.ptx.coef, skipped_units)
            train_metrics["zero_gradient_frac"] = 1 - len(batch) / len(samples)
        train_done = time.perf_counter()
        if samples:
            self.version = workers.weight_sync.push(self.version + 1)
        sync_done = time.perf_counter()

        reasons: dict[str, int] = {}
        for t in trajectories:
            # "reward_error: ValueError: ..." counts as "reward_error".
            reason = t.reward.reason.split(":")[0] if t.reward is not None else t.status.value
            reasons[reason] = reasons.get(reason, 0) + 1
        count = max(len(trajectories), 1)
        row = {
            "step": step,
            "reward_mean": sum(t.reward.score for t in scored) / max(len(scored), 1),
            "response_len_mean": sum(t.generated_tokens for t in trajectories) / count,
            "truncated_frac": sum(t.truncated for t in trajectories) / count,
            "prefix_cache_hit_frac": sum(t.cached_prompt_tokens for t in trajectories) / max(sum(t.request_prompt_tokens for t in trajectories), 1),
            "reward_error_frac": sum(t.reward is not None and t.reward.failed for t in trajectories) / count,
            "temperature": temperature,
            "lr": lr,
            "samples_trained": sum(any(s.loss_mask) for s in samples),
            **train_metrics,
            "weight_version": self.version,
            "rollout_weight_version": min((t.oldest_version for t in trajectories if t.oldest_version >= 0), default=self.version),
            **step_rollout.metrics,
            "time_rollout_s": step_rollout.time_generate_s,
            "time_reward_s": step_rollout.time_reward_s,
            "time_train_s": train_done - rollout_done,
            "time_weight_sync_s": sync_done - train_done,
            "time_step_s": sync_done - started,
            "reward_reasons": reasons,
            **self.critique.step_metrics(trajectories, rollout.critic),
        }
        row.update(_episode_metrics([t for t in trajectories if t.task.env]))
        if config.reward.length.weight:
            row["length_reward_mean"] = sum(length_rewards.values()) / max(len(length_rewards), 1)
        if config.rollout.partial.enabled:
            staleness = [self.version - 1 - t.oldest_version for t in scored if t.oldest_version >= 0]
            row["staleness_mean"] = sum(staleness) / max(len(staleness), 1)
            row["staleness_max"] = max(staleness, default=0)
            row["stale_tokens"] = sum(s.loss_mask[i] for s in samples for i, v in enumerate(s.versions) if 0 <= v < self.version - 1)
        return row

    def _with_env(self, tasks: list[Task]) -> list[Task]:
        """The tasks, each without an environment of its own played in `data.env`."""
        data = self.config.data
        if not data.env:
            return tasks
        return [task if task.env else dataclasses.replace(task, env=data.env, env_kwargs=dict(data.env_kwargs)) for task in tasks]

    def _length_rewards(self, scored: list[Trajectory], step: int) -> dict[int, float]:
        """K1.5's length reward of each scored trajectory (by id), within its group."""
        groups: dict[str, list[Trajectory]] = {}
        for t in scored:
            groups.setdefault(t.group_id, []).append(t)
        additions: dict[int, float] = {}
        for members in groups.values():
            values = self.length_reward.additions([(t.reward.score, t.generated_tokens) for t in members], step - 1)
            additions.update(zip(map(id, members), values))
        return additions

    def training_samples(self, trajectories: list[Trajectory], length_rewards: dict[int, float]) -> list[TrainSample]:
        """Advantages per group id over the trainable members (the loss's own, on rewards plus the
        length reward); the others stay in the batch, masked out of the loss (a failed reward or
        environment is never training signal)."""
        trainable = [t for t in trajectories if t.trainable]
        rewards = [t.reward.score + length_rewards.get(id(t), 0.0) for t in trainable]
        advantages = dict(zip(map(id, trainable), self.loss.advantages(rewards, [t.group_id for t in trainable])))
        return [
            TrainSample.of(t, advantages[id(t)]) if t.trainable else TrainSample.of(t, 0.0, loss_mask=[0] * len(t.loss_mask))
            for t in trajectories
        ]

    def _without_zero_gradients(self, samples: list[TrainSample]) -> tuple[list[TrainSample], float]:
        """The batch without the samples that add nothing to the gradient (`trainer.skip_zero_advantage`),
        where leaving them out changes nothing: one optimizer step per batch (the gradient is taken
        at pi_old), and no QK-Clip (its rescaling reads the attention logits of every sample)."""
        trainer = self.config.trainer
        if not trainer.skip_zero_advantage or trainer.optimizer_steps_per_batch > 1 or trainer.qk_clip_threshold > 0:
            return samples, 0.0
        return self.loss.without_zero_gradients(samples)

    def _ptx_eval(self, workers: Workers) -> dict[str, float]:
        """The loss on the held-out PTX examples: how much of that skill the policy keeps."""
        if self.ptx is None or not self.ptx.heldout:
            return {}
        return {"ptx_eval_loss": workers.trainers.ptx_eval(self.ptx.heldout)}

    def _evaluate(self, rollout: RolloutManager) -> float:
        """Greedy accuracy on the held-out tasks; a response cut at its budget counts as wrong."""
        return accuracy([t.reward for t in rollout.evaluate(self.eval_tasks)])

    def _count_failures(self, trajectories: list[Trajectory]) -> None:
        """Count responses whose reward raised and episodes whose environment failed; stop the run
        past `reward.max_error_frac` or `rollout.max_environment_error_frac` of them so far (taken
        over at least 100, so that one early failure cannot end a run)."""
        rewards_failed = [t for t in trajectories if t.reward is not None and t.reward.failed]
        if rewards_failed and self.reward_errors == 0:
            log.error("reward %r raised on task %r (further reward errors are counted, not logged):\n%s",
                      rewards_failed[0].task.reward, rewards_failed[0].task.task_id, rewards_failed[0].reward.error)
        environments_failed = [t for t in trajectories if t.status is EpisodeStatus.FAILED]
        if environments_failed and self.environment_errors == 0:
            log.error("%s (further environment failures are counted, not logged)", environments_failed[0].error)
        self.reward_errors += len(rewards_failed)
        self.responses_scored += sum(t.reward is not None for t in trajectories)
        self.environment_errors += len(environments_failed)
        self.episodes_played += len(trajectories)
        train_log = self.run_dir / "train.log"
        limit = self.config.reward.max_error_frac
        if self.reward_errors > limit * max(self.responses_scored, 100):
            first = rewards_failed[0].reward.reason if rewards_failed else "see train.log"
            raise RewardErrorLimit(
                f"rewards raised on {self.reward_errors} of {self.responses_scored} responses, more than "
                f"reward.max_error_frac={limit:g} allows ({first}; the first traceback is in {train_log})"
            )
        limit = self.config.rollout.max_environment_error_frac
        if self.environment_errors > limit * max(self.episodes_played, 100):
            first = environments_failed[0].error if environments_failed else "see train.log"
            raise EnvironmentErrorLimit(
                f"environments failed in {self.environment_errors} of {self.episodes_played} episodes, more than "
                f"rollout.max_environment_error_frac={limit:g} allows ({first}; the first failure is in {train_log})"
            )

    def _checkpoint(self, step: int, workers: Workers, rollout: RolloutManager, fingerprint: str) -> None:
        staging = self.checkpoints.staging(step)
        workers.trainers.save_state(str(staging / "trainer"))
        self.critique.save(staging)
        state = LoopState(
            step=step,
            weight_version=self.version,
            sampler=self.sampler.state_dict(),
            rng=driver_rng_state(),
            reward_errors=self.reward_errors,
            responses_scored=self.responses_scored,
            environment_errors=self.environment_errors,
            episodes_played=self.episodes_played,
            model_fingerprint=fingerprint,
            partial_buffer=rollout.state_dict(),
            ptx=self.ptx.state_dict() if self.ptx else {},
        )
        path = self.checkpoints.commit(staging, state, self.run_dir / "metrics.jsonl")
        log.info("checkpoint written: %s", path)

    def _restore(self, workers: Workers, rollout: RolloutManager, path: Path, state: LoopState) -> int:
        """Load a checkpoint into the trainer, the rollout's partial buffer and the loop; returns its step."""
        workers.trainers.load_state(str(path / "trainer"))
        rollout.load_state_dict(state.partial_buffer, self.temperature.at(state.step))
        self.sampler.load_state_dict(state.sampler)
        if self.ptx:
            self.ptx.load_state_dict(state.ptx)
        self.critique.load(path)
        restore_driver_rng(state.rng)
        self.version = state.weight_version
        self.reward_errors, self.responses_scored = state.reward_errors, state.responses_scored
        self.environment_errors, self.episodes_played = state.environment_errors, state.episodes_played
        (self.run_dir / "metrics.jsonl").write_text((path / "metrics.jsonl").read_text() if (path / "metrics.jsonl").is_file() else "")
        log.info("resumed from %s (step %d, weight version %d)", path, state.step, state.weight_version)
        return state.step

    def _on_signal(self, signum: int, frame) -> None:
        if self._stop_signal is not None:
            raise KeyboardInterrupt  # a second signal: stop now
        self._stop_signal = signum
        log.warning("%s: finishing this step, writing a checkpoint, then stopping (again to stop at once)", signal.Signals(signum).name)


def _episode_metrics(episodes: list[Trajectory]) -> dict[str, float]:
    """Of environment episodes: policy turns per episode, and the share that called a tool (got a
    `tool` message back) at least once."""
    if not episodes:
        return {}
    return {
        "turns_mean": sum(sum(turn.role == "assistant" for turn in t.turns) for t in episodes) / len(episodes),
        "tool_call_rate": sum(any(m["role"] == "tool" for m in t.messages) for t in episodes) / len(episodes),
    }


# The packages whose log lines go to the run log (train.log); warnings also reach the console.
_LOGGERS = ("k2rl", "rl", "rollout", "rewards", "sandboxes")


def _log_to(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in _LOGGERS:
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    return handler


def _stop_logging_to(handler: logging.Handler) -> None:
    for name in _LOGGERS:
        logging.getLogger(name).removeHandler(handler)
    handler.close()
