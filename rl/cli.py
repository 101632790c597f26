"""`k2rl` command line: train, bootstrap, score, sandbox, bench.

Every expected failure (bad config, missing file, unknown reward, an engine that
does not start) ends with one `k2rl: error: ...` line and exit status 2, after the
Ray cluster and its actors have been shut down. Ctrl-C and SIGTERM end every command the
same way, with a `k2rl: error: interrupted` line (and exit status 2), except that a training run,
also the one inside `bench step` and `bench rollout`, first finishes its step; `train` then
writes a checkpoint and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path

from rewards import UnknownRewardError
from rl import stop_signals
from rl.config import EMBEDDED_POLICIES, ConfigError, load_config

EXIT_ERROR = 2


def _fail(message: str) -> int:
    print(f"k2rl: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """`k2rl train [CONFIG.yaml] [key=value ...]`: the config file is the one argument without `=`."""
    files = [a for a in args if "=" not in a]
    if len(files) > 1:
        raise ConfigError(f"expected at most one config file, got {', '.join(files)}")
    return (files[0] if files else None), [a for a in args if "=" in a]


def _run_errors() -> tuple[type[BaseException], ...]:
    """What a run (or a bench's run) raises with a message that names its cause: one line each."""
    from rl.cluster.engine_pool import EngineStartError
    from rl.loop import FailureLimit
    from rl.run_checkpoint import CheckpointError
    from rl.weight_sync.transport import WeightSyncError
    from rollout.critic import CriticError
    from rollout.rendering import RenderError

    return (EngineStartError, ConfigError, CheckpointError, UnknownRewardError, FailureLimit, RenderError, WeightSyncError,
            CriticError)


def cmd_train(ns: argparse.Namespace) -> int:
    from rl.loop import Controller, RunFinished
    from rl.run_checkpoint import CheckpointError
    from rollout.environments import EnvironmentConfigError

    try:
        config, run_dir = _train_config(ns)
        controller = Controller(config, run_dir)
        model_path = resolve_model_path(config)
        controller.prepare(model_path, resume=ns.resume is not None)
    except RunFinished as finished:
        print(f"k2rl: {finished}")
        return 0
    except (ConfigError, CheckpointError, UnknownRewardError, EnvironmentConfigError, ImportError, ValueError, OSError) as error:
        return _fail(str(error))

    import ray

    from rl.cluster.ray_session import ray_session

    try:
        with ray_session(ns.ray_address, ns.verbose):
            summary = controller.run(model_path)
    except _run_errors() as error:
        return _fail(str(error))
    except ray.exceptions.RayError as error:
        return _fail(f"a Ray worker failed: {str(error).strip().splitlines()[-1]}")
    except KeyboardInterrupt:
        return _fail(f"interrupted; outputs so far are in {run_dir}")
    if summary.stopped_at is not None:
        print(f"k2rl: stopped after step {summary.stopped_at} with a checkpoint; continue with: k2rl train --resume {run_dir}")
        return 0
    accuracies = " -> ".join(f"{a:.3f}" for a in (summary.initial_eval_accuracy, summary.final_eval_accuracy) if a is not None)
    print(
        f"k2rl: done in {summary.seconds / 60:.1f} min; eval accuracy {accuracies or '-'}; "
        f"weight version {summary.weight_version}; outputs in {summary.run_dir}"
    )
    return 0


def _train_config(ns: argparse.Namespace):
    """The run's config and folder: a new run from a config file and overrides, or (--resume) the
    saved config of RUN_DIR with the overrides that a resume may change."""
    config_path, overrides = _split_config_args(ns.config_and_overrides)
    if ns.resume is None:
        config = load_config(config_path, overrides)
        run_dir = Path(ns.run_dir or f"runs/{config.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        if (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists():
            raise ConfigError(f"--run-dir {run_dir} already holds a run; continue it with --resume {run_dir} or choose another folder")
        return config, run_dir
    run_dir = Path(ns.resume)
    if ns.run_dir is not None and Path(ns.run_dir).resolve() != run_dir.resolve():
        raise ConfigError(f"--resume {run_dir} writes into that run's folder; leave out --run-dir {ns.run_dir}")
    if config_path is not None:
        raise ConfigError(f"--resume continues with {run_dir}/config.json; give overrides only, not the config file {config_path}")
    return resume_config(run_dir, overrides), run_dir


def resume_config(run_dir: Path, overrides: list[str]):
    """`k2rl train --resume RUN_DIR`'s config: the run's saved config with `overrides`, which may
    change only what a resume can change; RUN_DIR must hold a checkpoint."""
    from rl.config import RESUMABLE_KEYS, config_from_dict, resumable
    from rl.run_checkpoint import RunCheckpoints

    saved_path = run_dir / "config.json"
    if not saved_path.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.json there (not a k2rl run directory)")
    try:
        saved = config_from_dict(json.loads(saved_path.read_text()))
    except json.JSONDecodeError as error:
        raise ConfigError(f"--resume {run_dir}: {saved_path} is not valid JSON ({error})") from None
    config = config_from_dict(saved.to_dict(), overrides)
    refused = [key for key in config.changed_keys(saved) if not resumable(key)]
    if refused:
        raise ConfigError(f"--resume cannot change {refused[0]}: it changes what the run learns (resumable keys: "
                          f"{', '.join(key + '*' if key.endswith('.') else key for key in RESUMABLE_KEYS)})")
    if not RunCheckpoints(run_dir, config.checkpoint.keep).completed():
        raise ConfigError(f"--resume {run_dir}: it holds no checkpoint")
    return config


def resolve_model_path(config) -> str:
    from rl.bootstrap import ensure_default_policy

    if not config.model.path:
        return str(ensure_default_policy(config.model.embedded))
    return require_model_dir(config.model.path, "model.path:")


def require_model_dir(path: str, named: str) -> str:
    """`path` if it is a Hugging Face model directory, else one line naming it (`named` says where it was given)."""
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"{named} {path} is not a Hugging Face model directory (no config.json)")
    return str(path)


def cmd_bootstrap(ns: argparse.Namespace) -> int:
    from rl.bootstrap import EMBEDDED_POLICIES, bootstrap, default_policy_dir

    name, spec = EMBEDDED_POLICIES[ns.embedded]
    out_dir = Path(ns.out) if ns.out else default_policy_dir(name)
    try:
        report = bootstrap(out_dir, spec)
    except ValueError as error:
        return _fail(str(error))
    print(f"k2rl: built the {ns.embedded} policy in {report.seconds:.0f} s: {report.describe()}; saved to {out_dir}")
    return 0


def cmd_score(ns: argparse.Namespace) -> int:
    from rewards import get_reward, is_group_reward
    from rewards.offline import score_jsonl
    from rollout.critic import CriticError

    input_path, output_path = Path(ns.input), Path(ns.output)
    if not input_path.is_file():
        return _fail(f"--input {input_path} does not exist")
    if not output_path.parent.is_dir():
        return _fail(f"--output {output_path}: folder {output_path.parent} does not exist")
    if ns.concurrency < 1:
        return _fail(f"--concurrency must be >= 1, got {ns.concurrency}")
    try:
        if is_group_reward(get_reward(ns.reward)):
            summary = _score_groups(ns, input_path, output_path)
        elif ns.critic_model or ns.critic_url:
            return _fail(f"reward {ns.reward!r} scores each response alone and uses no critic; drop --critic-model / --critic-url")
        else:
            summary = score_jsonl(ns.reward, input_path, output_path, ns.concurrency)
    except (UnknownRewardError, ConfigError, CriticError, ImportError, OSError) as error:
        return _fail(str(error))
    except KeyboardInterrupt:
        return _fail(f"interrupted; {output_path} is incomplete")
    print(f"k2rl: scored {summary.describe()}; wrote {output_path}")
    return 0


def _score_groups(ns: argparse.Namespace, input_path: Path, output_path: Path):
    """Score a file of groups with a group reward, on the critic that --critic-model (engines of
    its own, on a local Ray cluster) or --critic-url names; a critic that cannot start fails in one line."""
    from rewards.offline import score_groups_jsonl
    from rl.config import RunConfig
    from rollout.critic import EndpointCritic, ModelCritic, check_model_dir

    if not ns.critic_model and not ns.critic_url:
        raise ConfigError(f"reward {ns.reward!r} scores groups with a critic: give --critic-model DIR or --critic-url URL")
    settings = RunConfig().reward.critic
    if ns.critic_url:
        critic = EndpointCritic.connect(ns.critic_url, settings.model, settings.timeout_s, settings.max_concurrency)
        return score_groups_jsonl(ns.reward, input_path, output_path, ns.concurrency, critic)
    check_model_dir(ns.critic_model)
    from rl.cluster.ray_session import ray_session

    with ray_session():
        critic = ModelCritic.start(ns.critic_model, RunConfig(), settings.num_engines, settings.max_model_len, settings.kv_cache_gib)
        try:
            return score_groups_jsonl(ns.reward, input_path, output_path, ns.concurrency, critic)
        finally:
            critic.close()


def cmd_sandbox_build_image(ns: argparse.Namespace) -> int:
    from sandboxes import SandboxUnavailable, build_image

    try:
        build_image(ns.name)
    except SandboxUnavailable as error:
        return _fail(str(error))
    print(f"k2rl: built sandbox image {ns.name}")
    return 0


def cmd_bench_sandbox(ns: argparse.Namespace) -> int:
    from sandboxes import SandboxUnavailable
    from sandboxes.bench import run_sandbox_bench

    for flag, value in (("--programs", ns.programs), ("--concurrency", ns.concurrency)):
        if value <= 0:
            return _fail(f"{flag} must be > 0, got {value}")
    try:
        bench = run_sandbox_bench(ns.programs, ns.concurrency, ns.image)
    except SandboxUnavailable as error:
        return _fail(str(error))
    print(json.dumps(bench.to_dict(), indent=2) if ns.json else bench.describe())
    return 0


def cmd_bench_weight_sync(ns: argparse.Namespace) -> int:
    from rl.weight_sync.bench import run_weight_sync_bench

    for flag, value in (("--params", ns.params), ("--engines", ns.engines), ("--bucket-mb", ns.bucket_mb), ("--repeats", ns.repeats)):
        if not 0 < value < math.inf:
            return _fail(f"{flag} must be a finite number > 0, got {value:g}")
    try:
        bench = run_weight_sync_bench(int(ns.params), ns.engines, ns.bucket_mb, ns.repeats)
    except _run_errors() as error:
        return _fail(str(error))
    print(json.dumps(bench.to_dict(), indent=2) if ns.json else bench.describe())
    return 0


def cmd_bench_step(ns: argparse.Namespace) -> int:
    import tempfile

    from rl.bench import BenchSize, built_in_sizes, run_step_bench

    for flag, value in (("--steps", ns.steps), ("--length", ns.length), ("--prompts", ns.prompts), ("--samples", ns.samples)):
        if value is not None and value <= 0:
            return _fail(f"{flag} must be > 0, got {value}")
    if ns.warmup < 0:
        return _fail(f"--warmup must be >= 0, got {ns.warmup}")
    try:
        with tempfile.TemporaryDirectory(prefix="k2rl-bench-") as scratch:
            if ns.model:
                sizes = [BenchSize(Path(ns.model).name, require_model_dir(ns.model, "--model"), ns.prompts or 16, ns.samples or 8)]
            else:
                sizes = built_in_sizes(ns.sizes.split(","), Path(scratch))
            bench = run_step_bench(sizes, ns.steps, ns.warmup, ns.length, tuple(ns.overrides))
    except _run_errors() as error:
        return _fail(str(error))
    print(json.dumps(bench.to_dict(), indent=2) if ns.json else bench.describe())
    return 0


def cmd_bench_rollout(ns: argparse.Namespace) -> int:
    from rl.bootstrap import ensure_default_policy
    from rollout.bench import run_rollout_bench

    for flag, value in (("--requests", ns.requests), ("--length", ns.length), ("--repeats", ns.repeats), ("--steps", ns.steps)):
        if value <= 0:
            return _fail(f"{flag} must be > 0, got {value}")
    if ns.warmup < 0:
        return _fail(f"--warmup must be >= 0, got {ns.warmup}")
    try:
        model = require_model_dir(ns.model, "--model") if ns.model else str(ensure_default_policy())
        bench = run_rollout_bench(model, ns.requests, ns.length, ns.repeats, ns.steps, ns.warmup,
                                  overrides=tuple(ns.overrides))
    except _run_errors() as error:
        return _fail(str(error))
    print(json.dumps(bench.to_dict(), indent=2) if ns.json else bench.describe())
    return 0


def cmd_plot(ns: argparse.Namespace) -> int:
    from rl.metrics import plot_runs

    runs = {}
    for item in ns.runs:
        # LABEL=PATH, or a path (which may hold "=" itself).
        if Path(item).exists() or "=" not in item:
            label, path = Path(item).name, item
        else:
            label, _, path = item.partition("=")
        if label in runs:
            return _fail(f"two runs are labelled {label!r}: label them apart with LABEL=PATH")
        runs[label] = Path(path)
    if not Path(ns.out).parent.is_dir():
        return _fail(f"--out {ns.out}: folder {Path(ns.out).parent} does not exist")
    try:
        plot_runs(runs, ns.metric, Path(ns.out), ns.x)
    except (FileNotFoundError, ValueError) as error:
        return _fail(str(error))
    print(ns.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="k2rl", description="Kimi K2-style RL post-training for LLMs")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run the RL loop")
    train.add_argument(
        "config_and_overrides", nargs="*", metavar="CONFIG|key=value",
        help="an optional YAML config followed by dotted overrides, e.g. trainer.lr=1e-4",
    )
    train.add_argument("--run-dir", help="output folder (default runs/<name>-<timestamp>/)")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its latest checkpoint, with its saved config")
    train.add_argument(
        "--ray-address", metavar="HOST:PORT",
        help="join this Ray cluster (default: $RAY_ADDRESS, else a local cluster of the run's own)",
    )
    train.add_argument("--verbose", action="store_true", help="show Ray and vLLM worker logs")
    train.set_defaults(handler=cmd_train)

    plot = commands.add_parser("plot", help="one metric of several runs on one figure")
    plot.add_argument("runs", nargs="+", metavar="[LABEL=]RUN_DIR", help="run directories, each optionally labelled")
    plot.add_argument("--metric", default="eval_accuracy", help="a metrics.jsonl key (default eval_accuracy)")
    plot.add_argument("--x", choices=("step", "minutes"), default="step", help="against step or minutes of RL (default step)")
    plot.add_argument("--out", required=True, help="the PNG to write")
    plot.set_defaults(handler=cmd_plot)

    boot = commands.add_parser("bootstrap", help="(re)build an embedded policy")
    boot.add_argument("--embedded", choices=EMBEDDED_POLICIES, default="default", help="which one (model.embedded; default: default)")
    boot.add_argument("--out", help="output folder (default: the cache used by `k2rl train`)")
    boot.set_defaults(handler=cmd_bootstrap)

    score = commands.add_parser("score", help="score a JSONL file of responses with a registered reward")
    score.add_argument("--reward", required=True, help="registered reward name, e.g. math")
    score.add_argument("--input", required=True, help="JSONL: one object per line with `response` (a group reward: `responses` "
                       "and `prompt`) and the reward's fields")
    score.add_argument("--output", required=True, help="JSONL: each input object plus `reward` and `reward_info`")
    score.add_argument("--concurrency", type=int, default=4, help="responses (or groups) scored at once (default 4)")
    critic = score.add_mutually_exclusive_group()
    critic.add_argument("--critic-model", metavar="DIR", help="a group reward's critic: this Hugging Face model on a vLLM engine")
    critic.add_argument("--critic-url", metavar="URL", help="a group reward's critic: an OpenAI-compatible endpoint (http://host:port/v1)")
    score.set_defaults(handler=cmd_score)

    sandbox = commands.add_parser("sandbox", help="manage the code-execution sandbox").add_subparsers(
        dest="sandbox_command", required=True
    )
    build = sandbox.add_parser("build-image", help="build the sandbox image from a Debian root filesystem")
    build.add_argument("--name", default="k2rl-sandbox:latest", help="image name (default k2rl-sandbox:latest)")
    build.set_defaults(handler=cmd_sandbox_build_image)

    bench = commands.add_parser("bench", help="benchmarks, measured against a baseline in the same run").add_subparsers(
        dest="bench_command", required=True
    )
    bench_sandbox = bench.add_parser("sandbox", help="warm container pool vs one `docker run` per program")
    bench_sandbox.add_argument("--programs", type=int, default=200, help="short programs per side (default 200)")
    bench_sandbox.add_argument("--concurrency", type=int, default=4, help="runs at once, and pool size (default 4)")
    bench_sandbox.add_argument("--image", default="k2rl-sandbox:latest")
    bench_sandbox.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench_sandbox.set_defaults(handler=cmd_bench_sandbox)
    bench_sync = bench.add_parser("weight-sync", help="weight-sync updates into vLLM engines vs memcpy")
    bench_sync.add_argument("--params", type=float, default=1e8, help="model size in parameters (default 1e8)")
    bench_sync.add_argument("--engines", type=int, default=2, help="rollout engines (default 2)")
    bench_sync.add_argument("--bucket-mb", type=float, default=128.0, help="bucket size in MB (default 128, as weight_sync.bucket_mb)")
    bench_sync.add_argument("--repeats", type=int, default=3, help="timed rounds (memcpy, then the updates); each figure is its best (default 3)")
    bench_sync.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench_sync.set_defaults(handler=cmd_bench_weight_sync)
    bench_step = bench.add_parser("step", help="RL steps through k2rl vs a single-process baseline on the same work")
    bench_step.add_argument("--sizes", default="default,large", help="built-in sizes: default (the embedded policy), large (~60 M)")
    bench_step.add_argument("--model", help="bench this Hugging Face model directory instead of the built-in sizes")
    bench_step.add_argument("--prompts", type=int, help="prompts per step, with --model (default 16)")
    bench_step.add_argument("--samples", type=int, help="samples per prompt, with --model (default 8)")
    bench_step.add_argument("--length", type=int, default=48, help="tokens of every response (default 48)")
    bench_step.add_argument("--steps", type=int, default=3, help="timed steps per side (default 3)")
    bench_step.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    bench_step.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench_step.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE for the run (e.g. rollout.num_engines=1)")
    bench_step.set_defaults(handler=cmd_bench_step)
    bench_rollout = bench.add_parser("rollout", help="rollout layer vs offline LLM.generate; partial rollout vs none")
    bench_rollout.add_argument("--model", help="a Hugging Face model directory (default: the embedded policy)")
    bench_rollout.add_argument("--requests", type=int, default=128, help="requests in the overhead comparison (default 128)")
    bench_rollout.add_argument("--length", type=int, default=48, help="tokens of each of those responses (default 48)")
    bench_rollout.add_argument("--repeats", type=int, default=5, help="timed rounds, each timing every side back to back; medians count (default 5)")
    bench_rollout.add_argument("--steps", type=int, default=6, help="steady-state steps of each partial-rollout side (default 6)")
    bench_rollout.add_argument("--warmup", type=int, default=6, help="steps before those, while the long episodes fill the buffer (default 6)")
    bench_rollout.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench_rollout.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE for the engine (e.g. rollout.cpu_threads=1)")
    bench_rollout.set_defaults(handler=cmd_bench_rollout)
    return parser


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ns = build_parser().parse_args(argv)
    # SIGTERM (`kill`, a scheduler's stop) ends a command as Ctrl-C does, so that its cleanup runs:
    # Ray shut down, temporary files removed. A training run finishes its step first (rl/loop.py).
    previous = stop_signals.install(signal.default_int_handler, (signal.SIGTERM,))
    try:
        return ns.handler(ns)
    except KeyboardInterrupt:
        return _fail("interrupted")
    finally:
        stop_signals.restore(previous)


if __name__ == "__main__":
    sys.exit(main())
