"""`k2rl bench rollout`: what the rollout layer costs, and what partial rollout saves, in one run.

Overhead: the same requests (arithmetic prompts, every response forced to the same length;
each side's seeds its own) through the whole rollout layer (RolloutManager -> EnginePool -> the engine actor's
AsyncLLM, episodes, rendering, scoring) against vLLM's offline `LLM.generate` in an actor of its
own with the same engine arguments, both computing with the CPU threads that each engine of the
default run has on this machine (`rollout.cpu_threads` overrides it). Both sides do the same work:
the offline side's responses are decoded and scored with the same reward, in the driver, as the
rollout layer scores its own (the responses all end in one engine step, so none of that scoring can
hide behind generation on either side). Goal: at most 1.10x. Beside
it, the same requests in one streaming call to the engine actor, which splits the overhead into the
engine's (its async engine runs the engine core in a process of its own) and the rest of the
rollout layer's. Each round times the three back to back; the figures are medians over the rounds.

Partial rollout: steady-state steps of the whole loop on a task mix with a long tail (most tasks
answer in a few tokens, a few at a long budget; every response runs to its task's budget), with
and without partial rollout (`rollout.partial.max_episode_tokens_per_step`: twice the short
answers' length). Reported per side: seconds per step, samples trained per second, and with
partial rollout the buffer size and the tokens masked as stale.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from rl.config import ConfigError, RunConfig, load_config


@dataclass
class OverheadResult:
    """Medians over the timed rounds; each ratio is the median of the rounds' own ratios."""

    requests: int
    tokens_per_request: int
    rounds: int
    # Each side's torch threads on CPU (0: on GPU, vLLM's choice).
    engine_threads: int
    # Offline generation, then decoding and scoring its responses (`offline_scoring_s` of it).
    offline_s: float
    offline_scoring_s: float
    # The same requests in one streaming call to the engine actor from the driver: the async
    # engine, its engine-core process and Ray, without the rollout layer's episodes and scoring.
    engine_call_s: float
    rollout_layer_s: float
    ratio: float
    engine_call_ratio: float


@dataclass
class PartialSide:
    step_s: float
    rollout_s: float
    samples_per_s: float
    samples_per_step: float
    partial_buffer_size: float = 0.0
    stale_tokens: float = 0.0


@dataclass
class PartialResult:
    short_tokens: int
    long_tokens: int
    long_share: float
    # Tokens per episode per step on the partial side.
    budget: int
    without: PartialSide
    with_partial: PartialSide

    @property
    def speedup(self) -> float:
        return self.with_partial.samples_per_s / self.without.samples_per_s


@dataclass
class RolloutBench:
    overhead: OverheadResult
    partial: PartialResult

    def to_dict(self) -> dict:
        return {
            "overhead": asdict(self.overhead),
            "partial": {**asdict(self.partial), "speedup": self.partial.speedup},
        }

    def describe(self) -> str:
        o, p = self.overhead, self.partial
        return "\n".join([
            f"rollout layer vs offline LLM.generate: {o.requests} requests x {o.tokens_per_request} tokens, medians of "
            f"{o.rounds} rounds: {o.rollout_layer_s:.2f} s vs {o.offline_s:.2f} s, {o.ratio:.2f}x (goal <= 1.10x)"
            + (f"; one engine of {o.engine_threads} CPU thread(s) on each side" if o.engine_threads else ""),
            f"  both sides score their responses: {o.offline_scoring_s:.2f} s of the offline side's time",
            f"  the engine call alone (async engine + Ray, no episodes or scoring) against offline generation alone: "
            f"{o.engine_call_s:.2f} s vs {o.offline_s - o.offline_scoring_s:.2f} s, {o.engine_call_ratio:.2f}x",
            f"partial rollout: {1 - p.long_share:.0%} of tasks answer in {p.short_tokens} tokens, {p.long_share:.0%} in "
            f"{p.long_tokens}; with partial rollout each episode generates at most {p.budget} tokens per step",
            f"  without: {p.without.step_s:.2f} s/step (rollout {p.without.rollout_s:.2f} s), {p.without.samples_per_step:.1f} samples/step, "
            f"{p.without.samples_per_s:.1f} samples/s",
            f"  with:    {p.with_partial.step_s:.2f} s/step (rollout {p.with_partial.rollout_s:.2f} s), {p.with_partial.samples_per_step:.1f} samples/step, "
            f"{p.with_partial.samples_per_s:.1f} samples/s, buffer {p.with_partial.partial_buffer_size:.0f} episodes, "
            f"{p.with_partial.stale_tokens:.0f} stale tokens masked per step",
            f"  speedup {p.speedup:.2f}x (goal >= 1.5x)",
        ])


class OfflineEngine:
    """Run as a Ray actor: vLLM's offline `LLM` with the rollout engines' arguments."""

    def __init__(self, spec):
        from vllm import LLM

        from rollout.engine import engine_arguments

        self.llm = LLM(**engine_arguments(spec))

    def generate(self, prompts: list[list[int]], max_tokens: int, seeds: list[int]) -> tuple[float, list[list[int]]]:
        """The seconds `LLM.generate` took, and each request's response token ids."""
        from vllm import SamplingParams, TokensPrompt

        # The rollout engine's own request settings (rollout/engine.py), so that both sides do the same work.
        params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, ignore_eos=True, logprobs=0, flat_logprobs=True,
                                 detokenize=False, skip_clone=True) for seed in seeds]
        started = time.perf_counter()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return time.perf_counter() - started, [list(o.outputs[0].token_ids) for o in outputs]


def measure_overhead(workers, model_path: str, requests: int, length: int, repeats: int) -> OverheadResult:
    """`repeats` timed rounds after one untimed one, the rollout layer's side on the engine of
    `workers`. A round times the three sides back to back (offline, engine call, rollout layer),
    so that the machine's drift from one minute to the next meets all three alike."""
    import ray

    from rewards import RewardScorer
    from rollout.engine import GenerationRequest
    from rollout.episode import request_seed
    from rollout.manager import RolloutManager
    from rollout.rendering import Renderer

    renderer = Renderer.from_pretrained(model_path)
    tasks, prompts = overhead_prompts(renderer, requests)
    config = load_config(None, [f"model.path={model_path}", "rollout.n_samples=1", f"rollout.token_budgets.arithmetic={length}",
                                "rollout.ignore_eos=true"])
    workers.weight_sync.push(0)
    engine = workers.engines.engines[0]
    # The engine's own arguments and threads, with its weights read from the model directory.
    offline_spec = replace(workers.engines.engine_spec(0), model_path=model_path, load_format="auto")
    offline = ray.remote(num_cpus=0)(OfflineEngine).remote(offline_spec)
    scorer = RewardScorer(0)
    manager = RolloutManager(config, workers.engines, renderer, scorer)

    def seeds(side: str, round_: int) -> list[int]:
        """Seeds of a side's own in each round: as the rollout layer's do, each side's responses are
        new to the reward's memo of parsed answers."""
        return [request_seed(0, f"{side}-{round_}-{i}", 0, 0) for i in range(requests)]

    def offline_side(round_: int) -> tuple[float, float]:
        """Offline generation and the scoring of its responses, in seconds: the whole, and the scoring."""
        generate_s, responses = ray.get(offline.generate.remote(prompts, length, seeds("offline", round_)))
        started = time.perf_counter()
        scorer.score([(task, renderer.decode(ids), True) for task, ids in zip(tasks, responses)], config.reward.budget_penalty)
        scoring_s = time.perf_counter() - started
        return generate_s + scoring_s, scoring_s

    def engine_call(round_: int) -> float:
        requests = [GenerationRequest(f"bench-{round_}-{index}", tuple(prompt), length, 1.0, seed=seed, ignore_eos=True)
                    for index, (prompt, seed) in enumerate(zip(prompts, seeds("engine-call", round_)))]
        started = time.perf_counter()
        ray.get(list(engine.generate.remote(requests)))
        return time.perf_counter() - started

    def rollout_layer(round_: int) -> float:
        started = time.perf_counter()
        manager.collect(tasks, step=1 + round_, temperature=1.0, policy_version=0)
        return time.perf_counter() - started

    try:
        rounds = [(*offline_side(round_), engine_call(round_), rollout_layer(round_)) for round_ in range(repeats + 1)][1:]
    finally:
        manager.close()
        ray.kill(offline)
    offline_s, scoring_s, engine_s, layer_s = (statistics.median(times) for times in zip(*rounds))
    return OverheadResult(
        requests, length, len(rounds), offline_spec.cpu_threads, offline_s, scoring_s, engine_s, layer_s,
        ratio=statistics.median(layer / off for off, _, _, layer in rounds),
        engine_call_ratio=statistics.median(call / (off - scoring) for off, scoring, call, _ in rounds),
    )


def overhead_prompts(renderer, requests: int) -> tuple[list, list[list[int]]]:
    """The overhead comparison's arithmetic tasks and their prompts' token ids."""
    from rl.data import PromptSampler, arithmetic_eval_tasks

    tasks = PromptSampler(None, 0, arithmetic_eval_tasks(1)).sample(requests)
    return tasks, [renderer.prompt(t.messages) for t in tasks]


def check_length_fits(model_path: str, requests: int, length: int, max_model_len: int) -> None:
    """Refuse a response length that the engines' context cannot hold after the longest prompt,
    before any worker starts."""
    from rollout.rendering import Renderer

    longest = max(map(len, overhead_prompts(Renderer.from_pretrained(model_path), requests)[1]))
    if longest + length > max_model_len:
        raise ConfigError(
            f"--length {length} does not fit: the engines hold {max_model_len} tokens (rollout.max_model_len) and "
            f"the longest prompt takes {longest}, which leaves {max_model_len - longest}"
        )


def partial_tasks(path: Path, count: int, long_share: float) -> Path:
    """A task file: arithmetic prompts, a `long_share` of them of task type "long"."""
    from rl.data import PromptSampler, arithmetic_eval_tasks

    tasks = PromptSampler(None, 1, arithmetic_eval_tasks(1)).sample(count)
    every = round(1 / long_share)
    with path.open("w") as file:
        for index, task in enumerate(tasks):
            kind = "long" if index % every == 0 else "short"
            file.write(json.dumps({"id": f"{kind}-{index}", "prompt": task.messages[0]["content"], "task_type": kind,
                                   "answer": task.reward_spec["answer"]}) + "\n")
    return path


def partial_config(model_path: str, tasks: Path, short: int, long: int, steps: int, episode_budget: int,
                   micro_batch_size: int = 8, overrides: tuple[str, ...] = ()) -> RunConfig:
    return load_config(None, [
        f"model.path={model_path}", "rollout.num_engines=1", f"data.train_path={tasks}", f"data.eval_path={tasks}", "data.eval_size=1",
        f"data.eval_every={steps}", f"steps={steps}", "data.prompts_per_step=8", "rollout.n_samples=4",
        f"rollout.token_budgets.short={short}", f"rollout.token_budgets.long={long}", "rollout.ignore_eos=true",
        f"rollout.partial.max_episode_tokens_per_step={episode_budget}",
        "rollout.partial.max_staleness=8", "checkpoint.every=0", f"trainer.micro_batch_size={micro_batch_size}",
        # Equal work on both sides: every sample is trained on, whatever its advantage.
        "trainer.skip_zero_advantage=false", *overrides,
    ])


def measure_partial(workers, model_path: str, tasks: Path, short: int, long: int, long_share: float, steps: int,
                    warmup: int, overrides: tuple[str, ...] = ()) -> PartialResult:
    """Steady-state steps without and with partial rollout, each a run on `workers` (in their dtype
    and engine mode)."""
    from rl.loop import Controller

    # An episode pauses after twice a short answer: every step's generation ends there, and the long
    # episodes of several steps generate side by side.
    budget = 2 * short
    sides = []
    with tempfile.TemporaryDirectory(prefix="k2rl-bench-") as scratch:
        for side_budget in (0, budget):
            run_dir = Path(scratch) / f"run-{side_budget}"
            config = partial_config(model_path, tasks, short, long, warmup + steps, side_budget,
                                    workers.config.trainer.micro_batch_size,
                                    (f"model.dtype={workers.config.model.dtype}",
                                     f"rollout.enforce_eager={str(workers.config.rollout.enforce_eager).lower()}", *overrides))
            Controller(config, run_dir).run(model_path, workers=workers).completed()
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1 + warmup :]
            step = statistics.mean(row["time_step_s"] for row in rows)
            rollout = statistics.mean(row["time_rollout_s"] for row in rows)
            trained = statistics.mean(row["samples_trained"] for row in rows)
            sides.append(PartialSide(
                step_s=step, rollout_s=rollout, samples_per_s=trained / step, samples_per_step=trained,
                partial_buffer_size=statistics.mean(row.get("partial_buffer_size", 0) for row in rows),
                stale_tokens=statistics.mean(row.get("stale_tokens", 0) for row in rows),
            ))
    return PartialResult(short, long, long_share, budget, sides[0], sides[1])


def default_engine_threads(model_path: str) -> int:
    """The CPU threads each engine of a default run of this model has on this machine: its cores
    shared among the engines the default gives the model (what `rollout.cpu_threads: 0` gives them)."""
    from rl.cluster.placement import resolve_layout, shared_cores

    engines = resolve_layout(load_config(None, [f"model.path={model_path}"]), model_path).rollout.num_engines
    return shared_cores(["local"] * engines, {"local": os.cpu_count() or 1}, 0)


def run_rollout_bench(model_path: str, requests: int, length: int, repeats: int, steps: int, warmup: int,
                      workers=None, overrides: tuple[str, ...] = ()) -> RolloutBench:
    """Both measurements on one set of workers: started here (on a Ray cluster of its own), or
    `workers` already running for `model_path` (then with their trainer's micro-batch size).
    `overrides` (KEY=VALUE) change the workers' and the partial-rollout runs' config."""
    from rl.cluster.ray_session import ray_session
    from rl.cluster.workers import Workers
    from rollout.engine import fit_context

    # The overhead compares the rollout layer over one engine with one offline `LLM`, each computing
    # as one engine of the default run does on this machine: with its share of the cores.
    short, long, long_share = 16, 160, 0.125
    # The engines' context holds the longest response of either measurement after its prompt, as far
    # as the model's positions go (`check_length_fits` refuses a longer one).
    context = fit_context(model_path, max(long, length) + 96)
    overrides = (f"rollout.cpu_threads={default_engine_threads(model_path)}", "rollout.num_engines=1",
                 f"rollout.max_model_len={context}", *overrides)
    engines = load_config(None, overrides).rollout.num_engines
    if engines != 1:
        raise ConfigError(f"k2rl bench rollout compares one engine with one offline LLM: rollout.num_engines must stay 1, got {engines}")
    with tempfile.TemporaryDirectory(prefix="k2rl-bench-") as scratch:
        # As many tasks as prompts per step: every step plays the same mix, one long group in eight.
        tasks = partial_tasks(Path(scratch) / "tasks.jsonl", 8, long_share)
        # Each run of a partial-rollout side starts the workers' trainer from the model again.
        own_workers = workers is None
        config = partial_config(model_path, tasks, short, long, 1, 0, overrides=overrides) if own_workers else workers.config
        check_length_fits(model_path, requests, length, config.rollout.max_model_len)
        with ray_session():
            if own_workers:
                workers = Workers.start(config, model_path)
            try:
                overhead = measure_overhead(workers, model_path, requests, length, repeats)
                partial = measure_partial(workers, model_path, tasks, short, long, long_share, steps, warmup, overrides)
            finally:
                if own_workers:
                    workers.shutdown()
    return RolloutBench(overhead, partial)
