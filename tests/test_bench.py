"""`k2rl bench step` and `k2rl bench rollout` run end to end on the tiny policy (figures are not asserted)."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from processes import assert_all_exit, processes_with_marker, wait_for_step

from rl.cli import main

pytestmark = pytest.mark.integration

# One eager engine: it starts in a few seconds, where the tiny policy's default (two compiled engines)
# spends half a minute compiling. What is tested is the command, not the engines' speed.
QUICK_ENGINES = ("rollout.num_engines=1", "rollout.enforce_eager=true")


def _bench(capsys, *args: str) -> dict:
    """`k2rl bench ... --json` in this process, on the session's Ray cluster."""
    capsys.readouterr()
    assert main(["bench", *args, "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def test_bench_step_compares_k2rl_with_a_single_process_baseline(tiny_policy, ray_cluster, capsys):
    report = _bench(capsys, "step", f"--model={tiny_policy}", "--prompts=2", "--samples=2", "--length=4", "--steps=1", "--warmup=0",
                    "trainer.micro_batch_size=2", "rollout.n_samples=3", *QUICK_ENGINES)
    [size] = report["sizes"]
    # The work as the run's config has it, an override included.
    assert size["completions_per_step"] == 6 and size["response_tokens"] == 4
    assert set(size["ratios"]) == {"end_to_end", "rollout", "train"}
    assert set(size["k2rl"]["breakdown"]) == {"rollout", "reward", "train", "weight sync", "rest"}
    assert size["baseline"]["step_s"] > 0 and size["k2rl"]["tokens_per_s"] > 0


def test_sigterm_ends_bench_step_in_one_line_and_leaves_nothing_behind(tiny_policy, tmp_path):
    """SIGTERM reaches a bench while its run trains: the run finishes its step, the bench ends with
    one line and no figures of the cut-short run, and its Ray cluster, actors and temporary
    directories are gone. The command starts a Ray of its own, as from a shell."""
    marker, scratch = uuid.uuid4().hex, Path(tempfile.gettempdir())
    before = set(scratch.glob("k2rl-bench-*"))
    bench = subprocess.Popen(
        [sys.executable, "-m", "rl.cli", "bench", "step", f"--model={tiny_policy}", "--prompts=2", "--samples=2", "--length=4",
         "--steps=500", "--warmup=0", "trainer.micro_batch_size=2", *QUICK_ENGINES],
        env={**os.environ, "K2RL_TEST_RUN": marker}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    wait_for_step(bench, _run_dir(scratch, before, bench), 1)
    os.kill(bench.pid, signal.SIGTERM)  # as `kill PID` does: to the command, not to its Ray processes
    out, err = bench.communicate(timeout=300)
    assert bench.returncode == 2 and err.strip().splitlines()[-1] == "k2rl: error: interrupted", err[-3000:]
    assert "k2rl / baseline" not in out and set(scratch.glob("k2rl-bench-*")) == before
    assert_all_exit(lambda: processes_with_marker(f"K2RL_TEST_RUN={marker}"), 120, "the stopped bench")


def _run_dir(scratch: Path, before: set[Path], bench: subprocess.Popen, timeout_s: float = 300) -> Path:
    """The bench's run directory: the first new temporary directory to hold a config.json."""
    deadline = time.monotonic() + timeout_s
    while not (found := [d for d in set(scratch.glob("k2rl-bench-*")) - before if (d / "config.json").is_file()]):
        assert bench.poll() is None, bench.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"no run directory of the bench in {scratch} within {timeout_s:g} s"
        time.sleep(0.2)
    return found[0]


def test_bench_rollout_measures_the_layer_and_partial_rollout(tiny_policy, tiny_workers):
    from rollout.bench import run_rollout_bench

    # On the session's workers (the command starts its own, as `bench step` above does).
    bench = run_rollout_bench(str(tiny_policy), requests=4, length=4, repeats=1, steps=1, warmup=0, workers=tiny_workers)
    report = json.loads(json.dumps(bench.to_dict()))
    assert report["overhead"]["ratio"] > 0 and report["overhead"]["engine_call_ratio"] > 0 and report["partial"]["speedup"] > 0
    # Both sides compute with the threads of the engine measured, and the report says how many.
    assert report["overhead"]["engine_threads"] == tiny_workers.engines.engine_spec(0).cpu_threads
    assert "partial" in bench.describe()


def test_a_bad_bench_override_is_one_line(tiny_policy, capsys):
    assert main(["bench", "step", f"--model={tiny_policy}", "rollout.no_such_key=1"]) == 2
    assert "rollout.no_such_key" in capsys.readouterr().err
    assert main(["bench", "rollout", f"--model={tiny_policy}", "rollout.num_engines=2"]) == 2
    assert "rollout.num_engines must stay 1" in capsys.readouterr().err
    # The engines' context grows with --length up to the model's positions (256); a longer one is
    # refused before any worker starts.
    assert main(["bench", "rollout", f"--model={tiny_policy}", "--length=250"]) == 2
    assert "--length 250 does not fit: the engines hold 256 tokens (rollout.max_model_len)" in capsys.readouterr().err


def test_a_bench_size_that_does_not_fit_is_one_line():
    from rl.bench import check_memory
    from rl.config import ConfigError

    with pytest.raises(ConfigError, match=r"bench size 'huge': about .* GiB needed .* GiB free"):
        check_memory(10**12, "huge")


def test_the_large_size_is_a_deeper_model_with_the_policys_tokenizer(tiny_policy, tmp_path):
    from transformers import AutoConfig

    from rl.bench import LARGE, large_config, large_model
    from rl.cluster.placement import model_parameters

    config = AutoConfig.from_pretrained(large_model(tmp_path / "large", tiny_policy))
    assert all(getattr(config, key) == value for key, value in LARGE.items())
    assert len(config.layer_types) == config.num_hidden_layers
    assert 50e6 < model_parameters(large_config(tiny_policy)) < 100e6
