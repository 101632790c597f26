"""`k2rl bench step`: the same RL steps through k2rl and through a single-process baseline, in one run.

The baseline is the strong simple loop a TRL user gets: one process, every core's threads, one
batched Hugging Face `generate` with its KV cache for the rollout, then the same loss (K2's) and
optimizer (`trainer.optimizer`, AdamW by default) on the same micro-batches, each sample a row of its
own. Both sides sample the same prompts, and every response is forced to the same length
(`ignore_eos`), so they generate and train on the same tokens, in the same dtype (`model.dtype`;
auto picks bfloat16 on a CPU with AMX, float32 on others); how each side computes them is its own
(k2rl's trainer computes a group's prompt once, rl/trainer/shared_prompts.py).

Two sizes: the embedded default policy, and a larger Qwen2-shaped model of random weights (about
60 M parameters) built with the default policy's tokenizer. Each side runs `warmup` untimed steps,
then `steps` timed ones; the figures are medians over the timed steps:

    completions/s and tokens/s per side and per phase (rollout: generated tokens; train: all tokens
    of the batch), their ratios (k2rl / baseline), and k2rl's step broken down into rollout,
    reward, train, weight sync and the rest (sampling, building the batch, Ray calls).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch

from rewards import RewardScorer
from rl.config import ConfigError, RunConfig, load_config
from rl.data import PromptSampler, arithmetic_eval_tasks
from rl.metrics import read_metrics
from rl.records import TrainSample
from rl.schedule import Schedule
from rl.trainer.logprobs import token_logprobs
from rl.trainer.losses import LossSettings, TokenBatch, get_loss
from rl.trainer.optim import MuonWithAdamW
from rl.trainer.worker import MicroBatch

# The larger size: Qwen2-shaped, about 60 M parameters over the default policy's 512-token vocabulary.
LARGE = {"hidden_size": 640, "intermediate_size": 1728, "num_hidden_layers": 12, "num_attention_heads": 10,
         "num_key_value_heads": 10, "head_dim": 64}
# Bytes one parameter takes here: an engine's weights (plain and packed), up to two trainer ranks'
# replicated float32 training state, and the baseline's.
_BYTES_PER_PARAMETER = 2 * 4 + 2 * 16 + 16


@dataclass
class Side:
    """One side's medians: seconds per step and per phase, and the throughput they give."""

    step_s: float
    rollout_s: float
    train_s: float
    completions_per_s: float
    tokens_per_s: float
    rollout_tokens_per_s: float
    train_tokens_per_s: float
    breakdown: dict[str, float]
    # How the side generated, e.g. "2 eager engines".
    layout: str


@dataclass
class SizeResult:
    size: str
    parameters: int
    dtype: str
    completions_per_step: int
    response_tokens: int
    k2rl: Side
    baseline: Side

    @property
    def ratios(self) -> dict[str, float]:
        return {
            "end_to_end": self.baseline.step_s / self.k2rl.step_s,
            "rollout": self.baseline.rollout_s / self.k2rl.rollout_s,
            "train": self.baseline.train_s / self.k2rl.train_s,
        }


@dataclass
class StepBench:
    sizes: list[SizeResult]

    def to_dict(self) -> dict:
        return {"sizes": [{**asdict(size), "ratios": size.ratios} for size in self.sizes]}

    def describe(self) -> str:
        lines = []
        for size in self.sizes:
            lines.append(
                f"{size.size}: {size.parameters / 1e6:.1f} M parameters in {size.dtype}, {size.completions_per_step} "
                f"completions of {size.response_tokens} tokens per step"
            )
            lines.append(f"  {'':10}{'step s':>8}{'compl/s':>9}{'tok/s':>9}{'rollout tok/s':>15}{'train tok/s':>13}")
            for name, side in (("k2rl", size.k2rl), ("baseline", size.baseline)):
                lines.append(
                    f"  {name:10}{side.step_s:8.2f}{side.completions_per_s:9.1f}{side.tokens_per_s:9.0f}"
                    f"{side.rollout_tokens_per_s:15.0f}{side.train_tokens_per_s:13.0f}"
                )
            ratios = size.ratios
            lines.append(
                f"  k2rl / baseline: end to end {ratios['end_to_end']:.2f}x, rollout {ratios['rollout']:.2f}x, "
                f"train {ratios['train']:.2f}x"
            )
            lines.append("  k2rl step: " + ", ".join(f"{k} {v:.2f} s" for k, v in size.k2rl.breakdown.items()))
            lines.append(f"  rollout: k2rl on {size.k2rl.layout}, the baseline by {size.baseline.layout}")
        return "\n".join(lines)


def large_config(tokenizer_dir: Path):
    """The LARGE shape over the config of the policy in `tokenizer_dir`, built anew rather than
    changed in place, so that per-layer fields (layer_types) follow the new depth."""
    from transformers import AutoConfig

    small = AutoConfig.from_pretrained(tokenizer_dir)
    fields = {key: value for key, value in small.to_dict().items() if key != "layer_types"}
    return type(small)(**{**fields, **LARGE})


def large_model(out_dir: Path, tokenizer_dir: Path) -> Path:
    """A random Qwen2 model of the LARGE shape with the tokenizer of `tokenizer_dir`, saved to `out_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = large_config(tokenizer_dir)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir


def check_memory(parameters: int, size: str) -> None:
    """One clear line when a size cannot fit in this machine's free memory."""
    needed = parameters * _BYTES_PER_PARAMETER + 4 * 2**30  # engines' KV caches, processes
    free = psutil.virtual_memory().available
    if needed > free:
        raise ConfigError(
            f"bench size {size!r}: about {needed / 2**30:.1f} GiB needed ({parameters / 1e6:.0f} M parameters), "
            f"{free / 2**30:.1f} GiB free"
        )


def bench_config(model_path: str, prompts: int, samples: int, length: int, steps: int,
                 overrides: tuple[str, ...] = ()) -> RunConfig:
    """One k2rl run that does the benchmark's work: fixed-length responses, no evaluation to speak of.
    `overrides` (KEY=VALUE, as for `k2rl train`) come last: a setting to measure, such as
    rollout.num_engines=1; the baseline reads the same config for its share of the work."""
    return load_config(None, [
        f"model.path={model_path}", f"steps={steps}", f"data.prompts_per_step={prompts}", f"rollout.n_samples={samples}",
        f"rollout.token_budgets.arithmetic={length}", "rollout.ignore_eos=true", "data.eval_size=1",
        f"data.eval_every={steps}", "checkpoint.every=0", f"trainer.micro_batch_size={min(16, prompts * samples)}",
        f"rollout.max_model_len={max(256, length + 96)}",
        # Equal work: the baseline trains on every sample, so k2rl does too.
        "trainer.skip_zero_advantage=false",
        *overrides,
    ])


def run_k2rl(config: RunConfig, model_path: str, warmup: int) -> Side:
    from rl.loop import Controller

    with tempfile.TemporaryDirectory(prefix="k2rl-bench-") as run_dir:
        controller = Controller(config, Path(run_dir))
        controller.run(model_path).completed()
        rows = read_metrics(Path(run_dir))[1 + warmup :]
    rollout = controller.config.rollout
    layout = f"{rollout.num_engines} {'eager' if rollout.enforce_eager else 'compiled'} engine{'s' if rollout.num_engines > 1 else ''}"
    phases = {
        "rollout": "time_rollout_s", "reward": "time_reward_s", "train": "time_train_s", "weight sync": "time_weight_sync_s",
    }
    breakdown = {name: statistics.median(row[key] for row in rows) for name, key in phases.items()}
    step = statistics.median(row["time_step_s"] for row in rows)
    breakdown["rest"] = max(step - sum(breakdown.values()), 0.0)
    return _side(config, step, breakdown["rollout"], breakdown["train"], breakdown, _prompt_tokens(config, model_path), layout)


class Baseline:
    """The single-process loop: Hugging Face generate, then the same loss and optimizer.

    In `model.dtype`, as k2rl's side: float32 master weights for the optimizer, the train phase's
    forward and backward under torch's autocast (a TRL user's `bf16=True`), and generation by a
    copy of the model in that dtype, refreshed from the master weights before each rollout (the
    single-process form of k2rl's weight sync; its cost counts as rollout)."""

    def __init__(self, config: RunConfig, model_path: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(os.cpu_count() or 1)
        self.config = config
        self.compute_dtype = getattr(torch, config.model.dtype)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.generator = self.model
        if self.compute_dtype != torch.float32:
            self.generator = AutoModelForCausalLM.from_pretrained(model_path, dtype=self.compute_dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            # Many base models ship none; a batched `generate` pads, and what fills the pad is masked out.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.optimizer = MuonWithAdamW(self.model, config.trainer)
        self.loss = get_loss("k2")(LossSettings(tau=config.trainer.tau))
        self.sampler = PromptSampler(None, config.seed, arithmetic_eval_tasks(1))
        self.scorer = RewardScorer(0)
        # The same temperature at each step as k2rl's side (a schedule decays with the steps done).
        self.temperature = Schedule.parse(config.rollout.temperature, "rollout.temperature")
        self.steps_done = 0

    def step(self) -> tuple[float, float, float]:
        """One RL step; returns its total, rollout and train seconds."""
        config = self.config
        tasks = self.sampler.sample(config.data.prompts_per_step)
        length = config.rollout.token_budgets["arithmetic"]
        temperature = self.temperature.at(self.steps_done)
        started = time.perf_counter()
        prompts = [self.tokenizer.apply_chat_template(list(t.messages), add_generation_prompt=True, tokenize=False)
                   for t in tasks for _ in range(config.rollout.n_samples)]
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            if self.generator is not self.model:
                for target, source in zip(self.generator.parameters(), self.model.parameters(), strict=True):
                    target.copy_(source)
            output = self.generator.generate(**batch, max_new_tokens=length, min_new_tokens=length, do_sample=True,
                                         temperature=temperature, top_k=0, top_p=1.0, pad_token_id=self.tokenizer.pad_token_id)
        rolled = time.perf_counter()
        responses = output[:, batch["input_ids"].shape[1] :]
        texts = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        items = [(tasks[i // config.rollout.n_samples], text, False) for i, text in enumerate(texts)]
        rewards = [result.score for result in self.scorer.score(items, budget_penalty=0.0)]
        groups = [i // config.rollout.n_samples for i in range(len(texts))]
        advantages = self.loss.advantages(rewards, groups)
        samples = []
        for row, (ids, mask) in enumerate(zip(batch["input_ids"], batch["attention_mask"])):
            prompt = ids[mask.bool()].tolist()
            response = responses[row].tolist()
            n = len(response)
            samples.append(TrainSample(prompt + response, len(prompt), [1] * n, [0.0] * n, [temperature] * n, [0] * n, advantages[row]))
        scored = time.perf_counter()
        self._train(samples)
        self.steps_done += 1
        return time.perf_counter() - started, rolled - started, time.perf_counter() - scored

    def _train(self, samples: list[TrainSample]) -> None:
        micro = self.config.trainer.micro_batch_size
        self.optimizer.zero_grad()
        denominator = float(len(samples))
        for start in range(0, len(samples), micro):
            batch = MicroBatch.of(samples[start : start + micro], torch.device("cpu"))
            with torch.autocast("cpu", dtype=self.compute_dtype, enabled=self.compute_dtype != torch.float32):
                logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention).logits
            logprobs = token_logprobs(logits, batch.input_ids, batch.temperatures)
            stale = torch.zeros_like(batch.loss_mask, dtype=torch.bool)
            output = self.loss(TokenBatch(logprobs, logprobs.detach(), batch.rollout_logprobs, batch.loss_mask, stale,
                                          batch.advantages), denominator)
            output.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.trainer.max_grad_norm)
        self.optimizer.step()

    def close(self) -> None:
        self.scorer.close()


def run_baseline(config: RunConfig, model_path: str, warmup: int, steps: int) -> Side:
    baseline = Baseline(config, model_path)
    try:
        timings = [baseline.step() for _ in range(warmup + steps)][warmup:]
    finally:
        baseline.close()
    step, rollout, train = (statistics.median(t[i] for t in timings) for i in range(3))
    return _side(config, step, rollout, train, {}, _prompt_tokens(config, model_path), "generate in one process")


def _prompt_tokens(config: RunConfig, model_path: str) -> float:
    """The mean prompt length of the arithmetic prompts, in tokens (for the train phase's tokens/s)."""
    from rollout.rendering import Renderer

    renderer = Renderer.from_pretrained(model_path)
    tasks = PromptSampler(None, config.seed, arithmetic_eval_tasks(1)).sample(32)
    return statistics.mean(len(renderer.prompt(t.messages)) for t in tasks)


def _side(config: RunConfig, step: float, rollout: float, train: float, breakdown: dict, prompt_tokens: float,
          layout: str) -> Side:
    completions = config.data.prompts_per_step * config.rollout.n_samples
    length = config.rollout.token_budgets["arithmetic"]
    generated = completions * length
    return Side(
        step_s=step, rollout_s=rollout, train_s=train,
        completions_per_s=completions / step, tokens_per_s=generated / step,
        rollout_tokens_per_s=generated / rollout, train_tokens_per_s=completions * (length + prompt_tokens) / train,
        breakdown=breakdown, layout=layout,
    )


@dataclass(frozen=True)
class BenchSize:
    """What one size of the benchmark runs: a model and one step's work."""

    name: str
    model_path: str
    prompts: int
    samples: int


def built_in_sizes(names: list[str], scratch: Path) -> list[BenchSize]:
    """The default policy (16 prompts x 8 samples, the default run's step) and the large model (8 x 4)."""
    from rl.bootstrap import ensure_default_policy
    from rl.cluster.placement import model_parameters

    default_policy = ensure_default_policy()
    sizes = []
    for name in names:
        if name == "default":
            sizes.append(BenchSize(name, str(default_policy), 16, 8))
        elif name == "large":
            check_memory(model_parameters(large_config(default_policy)), name)
            sizes.append(BenchSize(name, str(large_model(scratch / "large", default_policy)), 8, 4))
        else:
            raise ConfigError(f"unknown bench size {name!r} (known: default, large)")
    return sizes


def run_step_bench(sizes: list[BenchSize], steps: int, warmup: int, length: int,
                   overrides: tuple[str, ...] = ()) -> StepBench:
    """Both sides at each size: k2rl first (on a Ray cluster of its own), then the baseline alone."""
    from transformers import AutoConfig

    from rl.cluster.placement import model_parameters, resolve_dtype
    from rl.cluster.ray_session import ray_session

    results = []
    for size in sizes:
        parameters = model_parameters(AutoConfig.from_pretrained(size.model_path))
        check_memory(parameters, size.name)
        config = bench_config(size.model_path, size.prompts, size.samples, length, warmup + steps, overrides)
        with ray_session():
            # Both sides compute in the dtype k2rl picks for this machine.
            config = resolve_dtype(config)
            k2rl = run_k2rl(config, size.model_path, warmup)
        baseline = run_baseline(config, size.model_path, warmup, steps)
        # The work as the config has it: overrides may change the prompts, samples or length.
        completions = config.data.prompts_per_step * config.rollout.n_samples
        results.append(SizeResult(size.name, parameters, config.model.dtype, completions,
                                  config.rollout.token_budgets["arithmetic"], k2rl, baseline))
    return StepBench(results)

