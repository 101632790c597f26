"""`k2rl bench step` and `k2rl bench rollout` run end to end on the tiny policy (figures are not asserted)."""

import json
import os
import signal
import tempfile
import threading
import time

import pytest

from rl.cli import main

pytestmark = pytest.mark.integration


def _bench(capsys, *args: str) -> dict:
    """`k2rl bench ... --json` in this process, on the session's Ray cluster."""
    capsys.readouterr()
    assert main(["bench", *args, "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])


def test_bench_step_compares_k2rl_with_a_single_process_baseline(tiny_policy, ray_cluster, capsys):
    report = _bench(capsys, "step", f"--model={tiny_policy}", "--prompts=2", "--samples=2", "--length=4", "--steps=1", "--warmup=0",
                    "trainer.micro_batch_size=2")
    [size] = report["sizes"]
    assert size["completions_per_step"] == 4 and set(size["ratios"]) == {"end_to_end", "rollout", "train"}
    assert set(size["k2rl"]["breakdown"]) == {"rollout", "reward", "train", "weight sync", "rest"}
    assert size["baseline"]["step_s"] > 0 and size["k2rl"]["tokens_per_s"] > 0


def test_sigterm_ends_bench_step_in_one_line_without_figures(tiny_policy, ray_cluster, capsys, tmp_path, monkeypatch):
    """The bench's run takes SIGTERM as a training run does (it finishes its step); the bench then
    ends as well, with no figures of the cut-short run and no temporary files left."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def terminate_once_the_run_has_begun():
        deadline = time.monotonic() + 300
        while not list(tmp_path.glob("k2rl-bench-*/metrics.jsonl")) and time.monotonic() < deadline:
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)

    handler_before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=terminate_once_the_run_has_begun, daemon=True).start()
    capsys.readouterr()
    assert main(["bench", "step", f"--model={tiny_policy}", "--prompts=2", "--samples=2", "--length=4", "--steps=200", "--warmup=0",
                 "trainer.micro_batch_size=2"]) == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines()[-1] == "k2rl: error: interrupted" and "k2rl / baseline" not in out
    assert not list(tmp_path.glob("k2rl-bench-*")) and signal.getsignal(signal.SIGTERM) is handler_before


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


def test_a_bench_size_that_does_not_fit_is_one_line():
    from rl.bench import check_memory
    from rl.config import ConfigError

    with pytest.raises(ConfigError, match=r"bench size 'huge': about .* GiB needed .* GiB free"):
        check_memory(10**12, "huge")


def test_the_large_size_is_a_deeper_model_with_the_policys_tokenizer(tiny_policy, tmp_path):
    from transformers import AutoConfig

    from rl.bench import LARGE, _large_parameters, large_model

    config = AutoConfig.from_pretrained(large_model(tmp_path / "large", tiny_policy))
    assert all(getattr(config, key) == value for key, value in LARGE.items())
    assert len(config.layer_types) == config.num_hidden_layers
    assert 50e6 < _large_parameters(tiny_policy) < 100e6
