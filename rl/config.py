"""Typed run configuration: YAML file + dotted command-line overrides -> validated dataclasses.

Every mistake is reported as one `ConfigError` line that names the key (or file)
before any process starts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the key or file."""


# The embedded policies (rl/bootstrap.py) that model.embedded names.
EMBEDDED_POLICIES = ("default", "self-critique", "tool-use")


@dataclass
class ModelConfig:
    # A Hugging Face model directory; empty means an embedded policy, built by `k2rl bootstrap`
    # on first use and cached.
    path: str = ""
    # Which embedded policy (rl/bootstrap.py): default, self-critique (comparisons in its SFT) or
    # tool-use (python-tool episodes in its SFT).
    embedded: str = "default"
    # The engines compute in this dtype; the trainer keeps float32 master weights and optimizer
    # state and computes in it (FSDP2 mixed precision). "auto": bfloat16 on GPUs and on CPUs with
    # AMX, float32 on other CPUs (rl/cluster/placement.py, `resolve_dtype`).
    dtype: str = "auto"
    # How messages become tokens: "chat" (the tokenizer's chat template), "plain" (rollout/rendering.py's
    # "User: ...\nAssistant:" format, for models without a template), or "auto" (chat when the tokenizer has one).
    prompt_format: str = "auto"


@dataclass
class CurriculumConfig:
    # Easy first (K1.5): after s steps the easiest max(start_fraction, s / steps) of the tasks (by
    # their difficulty; the arithmetic generator: its kinds) may be drawn. 0 steps: off.
    steps: int = 0
    start_fraction: float = 0.25


@dataclass
class PrioritizedConfig:
    # K1.5: each task drawn with probability proportional to max(1 - its running success rate, floor)
    # (the arithmetic generator: per kind of problem).
    enabled: bool = False
    floor: float = 0.05
    # Weight of a step's results in the running success rate.
    smoothing: float = 0.5


@dataclass
class DataConfig:
    # Task files: JSONL, Parquet, or a saved Hugging Face dataset directory; empty means the
    # built-in arithmetic task generator.
    train_path: str = ""
    eval_path: str = ""
    # Task field -> the file's column, for files whose columns have other names
    # (for example {prompt: question, answer: solution}); see rl/data/sources.py.
    columns: dict[str, str] = field(default_factory=dict)
    prompts_per_step: int = 32
    eval_size: int = 200
    eval_every: int = 10
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    prioritized: PrioritizedConfig = field(default_factory=PrioritizedConfig)
    # The arithmetic generator: this share of its problems are 2-digit x 2-digit multiplications
    # (0: its usual mix of additions, subtractions and small multiplications).
    arithmetic_hard_fraction: float = 0.0
    # The generator's kinds of problems, equally likely (rl/data/arithmetic.py): add, sub, mul,
    # mul-2x2, mul-3x3.
    arithmetic_kinds: list[str] = field(default_factory=lambda: ["add", "sub", "mul"])
    # The environment (and its env_kwargs) of every task that names none, generated or from a
    # file; empty: such tasks are single-turn.
    env: str = ""
    env_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class PartialRolloutConfig:
    # K2 partial rollout: once the engines have generated this many tokens in a step, unfinished
    # episodes pause and resume in the next step; 0 turns it off.
    max_tokens_per_step: int = 0
    # The same per episode (Kimi k1.5's segments): an episode that has generated this many tokens in
    # a step pauses and goes on in the next; 0 turns it off. A budget for the whole step stops the
    # long tail only where it is spent before the step's work is done, which in a steady state it
    # is not: each step then generates what it needs, and waits for its longest episode. A budget
    # per episode caps every step's generation at the same length.
    max_episode_tokens_per_step: int = 0
    # A paused group whose oldest token is more than this many weight versions old starts over.
    max_staleness: int = 2

    @property
    def enabled(self) -> bool:
        return self.max_tokens_per_step > 0 or self.max_episode_tokens_per_step > 0


@dataclass
class RolloutConfig:
    n_samples: int = 8
    # A number, or a decaying schedule (K2): {schedule: constant|linear|cosine|exponential, start,
    # end, steps}; see rl/schedule.py.
    temperature: float | dict[str, float | str] = 0.8
    top_p: float = 1.0
    # K2 budget control: the maximum response tokens per task type.
    token_budgets: dict[str, int] = field(default_factory=lambda: {"arithmetic": 48})
    default_token_budget: int = 64
    # Generate every response to its token budget, ignoring the end of sequence (benchmarks that
    # must compare equal work).
    ignore_eos: bool = False
    # "auto" (rl/cluster/placement.py, `resolve_layout`): on CPU two engines for a model under 20 M
    # parameters, one engine of all cores for a larger one. A small model's per-step work
    # (scheduling, sampling, many small kernels) runs on one core, so two engines of one thread each
    # generate about 1.5x faster than one of two threads; a larger model's decode step is bound by
    # its matrix products, which one engine spreads over all cores (docs/BENCHMARKS.md). On GPU, one
    # engine per GPU the trainer leaves (colocated: one per trainer rank).
    num_engines: int | str = "auto"
    # vLLM tensor parallelism inside each engine (GPU only); each worker takes its shards of the
    # full tensors the checkpoint engine writes.
    tensor_parallel_size: int = 1
    kv_cache_gib: int = 1
    max_model_len: int = 256
    # false compiles the model (torch.compile; on GPU with CUDA graphs), which makes an engine start
    # take longer: on CPU 4 s once torch's compile cache holds the model, 15 s or more before.
    # "auto": compiled on CPU, where it takes the many small kernels of a decode step out of Python
    # (the default run's evaluations 11% shorter, its rollouts 7%; a 60 M model's rollout 25%),
    # eager on GPU.
    enforce_eager: bool | str = "auto"
    # On CPU, the torch threads of each engine; 0: its node's cores shared among the engines placed
    # there (engines and trainer take turns, so an engine may use the cores the trainer leaves idle).
    cpu_threads: int = 0
    engine_start_timeout_s: float = 300.0
    # An engine that dies mid-run is restarted this many times before the run gives up.
    max_engine_restarts: int = 2
    # Episodes in flight at once, over all engines (the rest wait their turn); also the number of
    # requests one engine batches (vLLM's max_num_seqs).
    max_concurrent_episodes: int = 256
    # An episode ends, truncated, after this many policy turns.
    max_turns: int = 8
    # An environment's reset or step that takes longer ends its episode (recorded as failed).
    step_timeout_s: float = 30.0
    # Past this share of training episodes whose environment failed (raised, hung, answered
    # malformed), over at least 100, the run stops.
    max_environment_error_frac: float = 0.05
    # Ray actors that run environments with plain (blocking) reset/step, started on first need;
    # `async def` environments run in the driver's event loop.
    env_workers: int = 2
    partial: PartialRolloutConfig = field(default_factory=PartialRolloutConfig)
    # "disaggregated": engines and trainer ranks on devices of their own. "colocated": engine i and
    # trainer rank i share device i, taking turns (on GPU the engines sleep, vLLM sleep mode, while
    # the trainer works, and the trainer offloads to host memory while they generate). On CPU both
    # share the cores either way and nothing sleeps or offloads.
    placement: str = "disaggregated"


@dataclass
class WeightSyncConfig:
    # New weights move from the trainer into the engines in buckets of this size (a larger tensor
    # group gets a bucket of its own); two buckets' worth of shared memory are in use per node.
    bucket_mb: float = 128.0
    # How long an engine or the trainer waits for the other side at any step of an update.
    timeout_s: float = 120.0


@dataclass
class CheckpointConfig:
    # A run checkpoint (trainer state, sampler, RNGs, metrics) every this many steps; 0: only on
    # Ctrl-C / SIGTERM. `k2rl train --resume RUN_DIR` continues from the latest one.
    every: int = 50
    # How many of the latest checkpoints stay on disk.
    keep: int = 2


@dataclass
class LengthRewardConfig:
    # K1.5 length reward (rewards/length.py): within each group, up to +-0.5 x weight for short or
    # long responses (wrong ones are only penalised); 0: off.
    weight: float = 0.0
    # No length reward during the first this many steps.
    warmup_steps: int = 0


@dataclass
class CriticConfig:
    # Who judges for the rewards that generate (rubric, judge) and answers the held-out comparisons:
    # "policy" (the policy being trained, at its current weights, on the rollout engines: K2's
    # self-critique), a Hugging Face model directory (served on engines of its own, never updated),
    # or the base URL of an OpenAI-compatible endpoint (http://host:port/v1; the API key, if it needs
    # one, in the environment variable K2RL_CRITIC_API_KEY).
    backend: str = "policy"
    # A model directory: its engines, their context length and KV cache.
    num_engines: int = 1
    max_model_len: int = 1024
    kv_cache_gib: int = 1
    # An endpoint: the model to ask (empty: the first the endpoint lists), how long one request may
    # take, and how many requests are in flight at once.
    model: str = ""
    timeout_s: float = 60.0
    max_concurrency: int = 16
    # Critic refinement (K2): this share of each step's prompts are comparison tasks built from the
    # previous step's groups whose verifier scores differ, rewarded by agreement with the verifier; 0: off.
    share: float = 0.0
    # critic_agreement (and the length heuristic's) at every evaluation, on this many held-out pairs
    # built once at step 0 from responses to the eval prompts; 0: not measured.
    heldout_pairs: int = 0
    # The rubric of the comparison prompts of critic tasks and held-out pairs (a built-in name or a
    # file). Their replies are as long as the token budget of task type "critique" allows.
    rubric: str = "compact"


@dataclass
class RewardConfig:
    # A response cut at its token budget gets this instead of its reward.
    budget_penalty: float = 0.0
    num_workers: int = 0
    # A reward that raises leaves its response out of training; past this share of all responses
    # scored so far, the run stops.
    max_error_frac: float = 0.05
    length: LengthRewardConfig = field(default_factory=LengthRewardConfig)
    # Score every training task with this registered reward instead of its own (for example "rubric":
    # self-critique with no verifier in the reward); evaluation keeps each task's own reward, which the
    # replacement may still measure as its `verifier`. Empty: each task's own reward.
    train_reward: str = ""
    # Merged under the reward_spec of the tasks train_reward scores (a task's own keys win), for
    # example {rubrics: compact, schedule: anchor, verifier_weight: 0.0}; `verifier` defaults to the
    # task's own reward.
    train_reward_spec: dict[str, str | float] = field(default_factory=dict)
    critic: CriticConfig = field(default_factory=CriticConfig)


@dataclass
class PTXConfig:
    # K2's PTX loss: a next-token loss on a curated JSONL dataset (rl/data/ptx.py), against
    # forgetting. Empty path: off.
    path: str = ""
    # Weight of the PTX loss beside the policy loss; 0 mixes nothing in but still measures
    # `ptx_eval_loss` (the baseline a run with PTX is compared against).
    coef: float = 0.1
    # PTX sequences per step, as a share of the step's RL samples.
    share: float = 0.25
    # The last this many examples are held out: their loss is `ptx_eval_loss` at each evaluation.
    eval_size: int = 32


@dataclass
class TrainerConfig:
    # The trainer ranks form a data_parallel_size x tensor_parallel_size mesh. "auto"
    # (rl/cluster/placement.py, `resolve_layout`): on CPU two ranks of one thread each for a model
    # under 20 M parameters, one rank of all cores for a larger one. Two ranks split a small model's
    # many small kernels over the cores; a larger model's matrix products run faster on one rank's
    # threads than in two processes (docs/BENCHMARKS.md). On GPU, two.
    data_parallel_size: int | str = "auto"
    tensor_parallel_size: int = 1
    # How data-parallel ranks hold the model: "fsdp" (FSDP2: parameters, gradients and optimizer
    # state sharded), "replicate" (each rank holds all, gradients all-reduced: fastest for small
    # models), or "auto" (replicate when the model's training state takes under a quarter of a
    # rank's device memory).
    data_parallel_strategy: str = "auto"
    # The policy objective (rl/trainer/losses.py): "k2" (the K1.5/K2 squared objective), "grpo" or "ppo-clip".
    loss: str = "k2"
    # tau of the K1.5/K2 objective: weight of the log-ratio penalty.
    tau: float = 0.1
    # grpo / ppo-clip: the ratio pi_theta / pi_old is clipped to [1 - clip_low, 1 + clip_high].
    clip_low: float = 0.2
    clip_high: float = 0.2
    # grpo / ppo-clip: weight of a k3 estimate of KL(pi_theta || pi_rollout); 0: off.
    kl_coef: float = 0.0
    # grpo / ppo-clip: cap of the importance weight pi_old / pi_rollout on tokens an older weight
    # version generated (partial rollout); with k2 such tokens stay out of the loss.
    tis_cap: float = 2.0
    # "muon": Muon for the hidden matrices and AdamW for the rest (Moonlight, K2); "adamw": AdamW for all.
    optimizer: str = "adamw"
    # One learning rate for both optimizers (Muon's update is scaled to AdamW's RMS): a number, or a
    # schedule over the run's steps, {schedule: constant|linear|cosine|exponential, start, end,
    # steps}; see rl/schedule.py.
    lr: float | dict[str, float | str] = field(
        default_factory=lambda: {"schedule": "linear", "start": 2e-4, "end": 0.0, "steps": 150})
    weight_decay: float = 0.0
    # AdamW's (beta1, beta2); Muon keeps its own momentum (0.95).
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    micro_batch_size: int = 16
    optimizer_steps_per_batch: int = 1
    # With one optimizer step per batch, leave samples with advantage 0 out of the batch: their
    # gradient is zero, so the update is the same for less work (off: benchmarks of equal work).
    skip_zero_advantage: bool = True
    reset_optimizer_each_step: bool = False
    max_grad_norm: float = 1.0
    # Logprobs are computed from the final hidden states this many tokens at a time (recomputed in
    # the backward pass), so no [tokens, vocabulary] logits tensor of a whole micro-batch exists.
    logprob_chunk_size: int = 1024
    # The samples of a micro-batch that share a prompt are trained as rows that hold the prompt once,
    # each row at most this many tokens (rl/trainer/shared_prompts.py); 0 trains each sample as its own row.
    shared_prompt_row_tokens: int = 1024
    # QK-Clip (MuonClip): after each update, shrink the query/key projections of any head
    # whose largest attention logit exceeded this; 0 turns it off.
    qk_clip_threshold: float = 0.0
    ptx: PTXConfig = field(default_factory=PTXConfig)

    def loss_settings(self):
        """The loss's knobs (rl/trainer/losses.py); a bad value raises ValueError naming its key."""
        from rl.trainer.losses import LossSettings

        return LossSettings(tau=self.tau, clip_low=self.clip_low, clip_high=self.clip_high, kl_coef=self.kl_coef, tis_cap=self.tis_cap)

    def lr_schedule(self):
        """The learning rate by step (rl/schedule.py); a bad value raises ValueError naming trainer.lr."""
        from rl.schedule import Schedule

        return Schedule.parse(self.lr, "trainer.lr", zero_allowed=True)


@dataclass
class ClusterConfig:
    # The network interface that the trainer ranks' process group uses (GLOO_SOCKET_IFNAME /
    # NCCL_SOCKET_IFNAME); empty: the interface of each node's Ray address.
    network_interface: str = ""


@dataclass
class RunConfig:
    name: str = "k2rl"
    steps: int = 130
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def validate(self) -> None:
        """Reject combinations that cannot work, naming the keys involved."""
        positive = {
            "steps": self.steps,
            "data.prompts_per_step": self.data.prompts_per_step,
            "data.eval_size": self.data.eval_size,
            "data.eval_every": self.data.eval_every,
            "rollout.n_samples": self.rollout.n_samples,
            "rollout.default_token_budget": self.rollout.default_token_budget,
            "rollout.tensor_parallel_size": self.rollout.tensor_parallel_size,
            "rollout.kv_cache_gib": self.rollout.kv_cache_gib,
            "rollout.max_model_len": self.rollout.max_model_len,
            "rollout.max_concurrent_episodes": self.rollout.max_concurrent_episodes,
            "rollout.max_turns": self.rollout.max_turns,
            "rollout.step_timeout_s": self.rollout.step_timeout_s,
            "rollout.env_workers": self.rollout.env_workers,
            "trainer.tensor_parallel_size": self.trainer.tensor_parallel_size,
            "trainer.micro_batch_size": self.trainer.micro_batch_size,
            "trainer.optimizer_steps_per_batch": self.trainer.optimizer_steps_per_batch,
            "trainer.logprob_chunk_size": self.trainer.logprob_chunk_size,
            "trainer.max_grad_norm": self.trainer.max_grad_norm,
            "rollout.engine_start_timeout_s": self.rollout.engine_start_timeout_s,
            "checkpoint.keep": self.checkpoint.keep,
        }
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key} must be > 0, got {value}")
        for key, value in (("trainer.data_parallel_size", self.trainer.data_parallel_size), ("rollout.num_engines", self.rollout.num_engines)):
            if value != "auto" and (isinstance(value, str) or value <= 0):
                raise ConfigError(f"{key} must be > 0 or auto, got {value!r}")
        if isinstance(self.rollout.enforce_eager, str) and self.rollout.enforce_eager != "auto":
            raise ConfigError(f"rollout.enforce_eager must be true, false or auto, got {self.rollout.enforce_eager!r}")
        for task_type, budget in self.rollout.token_budgets.items():
            if budget <= 0:
                raise ConfigError(f"rollout.token_budgets.{task_type} must be > 0, got {budget}")
        for key, value in (("weight_sync.bucket_mb", self.weight_sync.bucket_mb), ("weight_sync.timeout_s", self.weight_sync.timeout_s)):
            if value <= 0:
                raise ConfigError(f"{key} must be > 0, got {value:g}")
        if self.trainer.data_parallel_strategy not in ("auto", "fsdp", "replicate"):
            raise ConfigError(
                f"trainer.data_parallel_strategy must be auto, fsdp or replicate, got {self.trainer.data_parallel_strategy!r}"
            )
        betas = self.trainer.adam_betas
        if len(betas) != 2 or not all(0 <= beta < 1 for beta in betas):
            raise ConfigError(f"trainer.adam_betas must be two numbers in [0, 1), got {betas}")
        if self.trainer.optimizer not in ("muon", "adamw"):
            raise ConfigError(f"trainer.optimizer must be muon or adamw, got {self.trainer.optimizer!r}")
        if self.rollout.partial.max_tokens_per_step < 0:
            raise ConfigError(f"rollout.partial.max_tokens_per_step must be >= 0 (0 is off), got {self.rollout.partial.max_tokens_per_step}")
        if self.rollout.partial.max_episode_tokens_per_step < 0:
            raise ConfigError("rollout.partial.max_episode_tokens_per_step must be >= 0 (0 is off), "
                              f"got {self.rollout.partial.max_episode_tokens_per_step}")
        if self.rollout.partial.max_staleness < 0:
            raise ConfigError(f"rollout.partial.max_staleness must be >= 0, got {self.rollout.partial.max_staleness}")
        if self.trainer.shared_prompt_row_tokens < 0:
            raise ConfigError(f"trainer.shared_prompt_row_tokens must be >= 0 (0 is off), got {self.trainer.shared_prompt_row_tokens}")
        if self.trainer.weight_decay < 0:
            raise ConfigError(f"trainer.weight_decay must be >= 0, got {self.trainer.weight_decay:g}")
        if self.reward.num_workers < 0:
            raise ConfigError(f"reward.num_workers must be >= 0 (0: score in the driver), got {self.reward.num_workers}")
        if self.checkpoint.every < 0:
            raise ConfigError(f"checkpoint.every must be >= 0 (0: only when stopped), got {self.checkpoint.every}")
        for key, value in (("reward.max_error_frac", self.reward.max_error_frac),
                           ("rollout.max_environment_error_frac", self.rollout.max_environment_error_frac)):
            if not 0 <= value <= 1:
                raise ConfigError(f"{key} must be in [0, 1], got {value}")
        self._check_critic()
        if self.model.prompt_format not in ("auto", "chat", "plain"):
            raise ConfigError(f"model.prompt_format must be auto, chat or plain, got {self.model.prompt_format!r}")
        if self.rollout.cpu_threads < 0:
            raise ConfigError(f"rollout.cpu_threads must be >= 0 (0: the node's cores), got {self.rollout.cpu_threads}")
        if self.rollout.max_engine_restarts < 0:
            raise ConfigError(f"rollout.max_engine_restarts must be >= 0, got {self.rollout.max_engine_restarts}")
        if self.rollout.placement not in ("disaggregated", "colocated"):
            raise ConfigError(f"rollout.placement must be disaggregated or colocated, got {self.rollout.placement!r}")
        self._check_recipe()
        if self.rollout.top_p != 1.0:
            # The trainer's logprobs do not model the top-p mask, so pi_old would be wrong.
            raise ConfigError(f"rollout.top_p must be 1.0 (top-p sampling is not supported yet), got {self.rollout.top_p}")
        longest = max([self.rollout.default_token_budget, *self.rollout.token_budgets.values()])
        if longest >= self.rollout.max_model_len:
            raise ConfigError(
                f"rollout.max_model_len={self.rollout.max_model_len} leaves no room for a prompt with the "
                f"largest token budget ({longest})"
            )
        if self.trainer.qk_clip_threshold < 0:
            raise ConfigError(
                f"trainer.qk_clip_threshold must be >= 0 (0 turns QK-Clip off), got {self.trainer.qk_clip_threshold}"
            )
        if self.model.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype must be auto, float32, bfloat16 or float16, got {self.model.dtype!r}")
        if self.trainer.data_parallel_size != "auto":
            check_batch_split(self)
        for key in ("model.path", "data.train_path", "data.eval_path"):
            section, name = key.split(".")
            path = getattr(getattr(self, section), name)
            if path and not Path(path).exists():
                raise ConfigError(f"{key}: {path} does not exist")
        if self.data.train_path and not self.data.eval_path:
            raise ConfigError("data.eval_path is required when data.train_path is set")

    def _check_recipe(self) -> None:
        """Build each part of the recipe once, so that a bad setting fails here, naming its key."""
        from rewards.length import LengthReward
        from rl.data.arithmetic import arithmetic_mix
        from rl.data.curriculum import Curriculum, SuccessRates
        from rl.trainer.losses import get_loss
        from rl.schedule import Schedule

        try:
            get_loss(self.trainer.loss)(self.trainer.loss_settings())
            Schedule.parse(self.rollout.temperature, "rollout.temperature")
            self.trainer.lr_schedule()
            LengthReward(self.reward.length.weight, self.reward.length.warmup_steps)
            if self.data.curriculum.steps:
                Curriculum(self.data.curriculum.steps, self.data.curriculum.start_fraction)
            if self.data.prioritized.enabled:
                SuccessRates(self.data.prioritized.floor, self.data.prioritized.smoothing)
            arithmetic_mix(self.data.arithmetic_hard_fraction, tuple(self.data.arithmetic_kinds))
        except ValueError as error:
            raise ConfigError(str(error)) from None
        ptx = self.trainer.ptx
        if ptx.path and (ptx.coef < 0 or not 0 < ptx.share <= 1 or ptx.eval_size < 0):
            raise ConfigError(
                f"trainer.ptx needs coef >= 0, share in (0, 1] and eval_size >= 0, got coef={ptx.coef:g}, "
                f"share={ptx.share:g}, eval_size={ptx.eval_size}"
            )
        if ptx.path and not Path(ptx.path).is_file():
            raise ConfigError(f"trainer.ptx.path: {ptx.path} does not exist")
        if self.data.arithmetic_hard_fraction and self.data.train_path:
            raise ConfigError("data.arithmetic_hard_fraction applies only to the built-in generator (data.train_path is set)")
        if self.data.env_kwargs and not self.data.env:
            raise ConfigError("data.env_kwargs needs data.env: the environment they are for")
        if self.model.embedded not in EMBEDDED_POLICIES:
            raise ConfigError(f"model.embedded must be one of {', '.join(EMBEDDED_POLICIES)}, got {self.model.embedded!r}")
        if self.model.embedded != "default" and self.model.path:
            raise ConfigError(f"model.embedded={self.model.embedded} picks an embedded policy; it needs model.path empty")

    def _check_critic(self) -> None:
        critic = self.reward.critic
        backend = critic.backend
        if backend != "policy" and not backend.startswith(("http://", "https://")) and not (Path(backend) / "config.json").is_file():
            raise ConfigError(
                f"reward.critic.backend: {backend!r} is not \"policy\", an http(s) URL, or a Hugging Face model "
                "directory (no config.json there)"
            )
        for key in ("num_engines", "max_model_len", "kv_cache_gib", "max_concurrency"):
            if getattr(critic, key) <= 0:
                raise ConfigError(f"reward.critic.{key} must be > 0, got {getattr(critic, key)}")
        if critic.timeout_s <= 0:
            raise ConfigError(f"reward.critic.timeout_s must be > 0, got {critic.timeout_s:g}")
        if not 0 <= critic.share < 1:
            raise ConfigError(f"reward.critic.share must be in [0, 1), got {critic.share:g}")
        if critic.heldout_pairs < 0:
            raise ConfigError(f"reward.critic.heldout_pairs must be >= 0 (0: not measured), got {critic.heldout_pairs}")
        from rewards import get_reward
        from rewards.rubric import load_rubric

        try:
            load_rubric(critic.rubric)
        except ValueError as error:
            raise ConfigError(f"reward.critic.rubric: {error}") from None
        if self.reward.train_reward:
            try:
                get_reward(self.reward.train_reward)
            except ValueError as error:
                raise ConfigError(f"reward.train_reward: {error}") from None

    def changed_keys(self, other: RunConfig) -> list[str]:
        """Dotted keys whose values differ between the two configs."""
        mine, theirs = _flatten(self), _flatten(other)
        return sorted(key for key, value in mine.items() if theirs[key] != value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Keys of earlier releases, and where they went: an old config gets one line saying so.
MOVED_KEYS = {
    "checkpoint.bucket_mb": "weight_sync.bucket_mb",
    "checkpoint.timeout_s": "weight_sync.timeout_s",
}

# What `k2rl train --resume RUN_DIR key=value ...` may change: how the run is laid out, how long it
# goes on, and how often it evaluates and checkpoints; never what it learns from or how.
RESUMABLE_KEYS = (
    "steps",
    "trainer.data_parallel_size",
    "trainer.tensor_parallel_size",
    "trainer.data_parallel_strategy",
    "trainer.micro_batch_size",
    "trainer.logprob_chunk_size",
    "trainer.shared_prompt_row_tokens",
    "rollout.num_engines",
    "rollout.kv_cache_gib",
    "rollout.cpu_threads",
    "rollout.engine_start_timeout_s",
    "rollout.max_engine_restarts",
    "rollout.placement",
    "data.eval_every",
    "checkpoint.",
    "weight_sync.",
    "cluster.",
    "reward.num_workers",
    "reward.max_error_frac",
    "rollout.max_environment_error_frac",
)


def resumable(key: str) -> bool:
    return any(key == allowed or (allowed.endswith(".") and key.startswith(allowed)) for allowed in RESUMABLE_KEYS)


def config_from_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """A validated config from a plain mapping (a saved `config.json`) plus overrides."""
    raw = json.loads(json.dumps(raw))
    for override in overrides:
        _apply_override(raw, override)
    config = _build(RunConfig, raw, prefix="")
    config.validate()
    return config


def check_batch_split(config: RunConfig) -> None:
    """The step's batch must split into equal parts over the data-parallel ranks and optimizer steps
    (checked again once `trainer.data_parallel_size: auto` is resolved)."""
    batch = config.data.prompts_per_step * config.rollout.n_samples
    shards = config.trainer.data_parallel_size * config.trainer.optimizer_steps_per_batch
    if batch % shards:
        raise ConfigError(
            f"batch of data.prompts_per_step x rollout.n_samples = {batch} trajectories does not divide "
            f"into trainer.data_parallel_size x trainer.optimizer_steps_per_batch = {shards} equal parts"
        )


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML file (or the defaults), apply `a.b.c=value` overrides, build and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of keys")
    return config_from_dict(raw, overrides)


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value for every leaf of a config dataclass (mappings such as
    `rollout.token_budgets` are leaves)."""
    flat = {}
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if dataclasses.is_dataclass(value):
            flat.update(_flatten(value, f"{prefix}{item.name}."))
        else:
            flat[f"{prefix}{item.name}"] = value
    return flat


def _apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `key.sub=value` in `raw`. Below a mapping field (`rollout.token_budgets.code=100`) the
    rest of the key is one entry of the mapping, added to the field's value or default."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({str(error).splitlines()[0]})") from None
    node, section = raw, RunConfig
    parts = key.split(".")
    for index, part in enumerate(parts[:-1]):
        item = next((f for f in dataclasses.fields(section) if f.name == part), None) if section else None
        if item is not None and not dataclasses.is_dataclass(typing.get_type_hints(section)[part]):
            mapping = node.get(part, _default(item))
            if not isinstance(mapping, dict):
                raise ConfigError(f"override {override!r}: {part} is not a section")
            node[part] = {**mapping, ".".join(parts[index + 1 :]): value}
            return
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
        node, section = child, typing.get_type_hints(section)[part] if item is not None else None
    node[parts[-1]] = value


def _default(item: dataclasses.Field) -> Any:
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return item.default


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    for name in unknown:
        if f"{prefix}{name}" in MOVED_KEYS:
            raise ConfigError(f"{prefix}{name} moved to {MOVED_KEYS[prefix + name]}")
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    values = {name: _coerce(hints[name], raw[name], f"{prefix}{name}") for name in raw}
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, prefix=f"{key}.")
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(item_type, item, f"{key}[{index}]") for index, item in enumerate(value)]
    if origin is dict:
        key_type, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {_coerce(key_type, k, f"{key}"): _coerce(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _coerce(option, value, key)
            except ConfigError as error:
                # A mapping's own error names the entry that is wrong.
                if isinstance(value, dict) and typing.get_origin(option) is dict:
                    raise error from None
        raise ConfigError(f"{key}: {value!r} matches none of {hint}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key} must be null, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        # YAML 1.1 reads `3e-5` (no dot) as a string.
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{key} must be a finite number, got {value!r}")
            return number
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"config field {key} has unsupported type {hint}")
    raise ConfigError(f"{key} must be {hint.__name__}, got {value!r}")
