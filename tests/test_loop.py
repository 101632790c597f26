"""The whole loop for real: Ray, a vLLM engine, two gloo trainer ranks, in-place weight updates."""

import gc
import json

import pytest
import ray
import torch
from conftest import TINY_WORKERS

from rl.config import load_config
from rl.loop import Controller
from rollout.rendering import Renderer

pytestmark = pytest.mark.integration


def test_two_iterations_update_engine_weights_in_place_as_the_temperature_decays(tiny_policy, tiny_workers, tmp_path):
    config = load_config(
        None,
        [
            "steps=2",
            "data.prompts_per_step=4",
            "rollout.n_samples=4",
            "data.eval_size=8",
            "data.eval_every=1",
            *TINY_WORKERS,
            # A decaying temperature: the trainer computes each token's logprob at its own temperature.
            "rollout.temperature={schedule: linear, start: 1.0, end: 0.6, steps: 2}",
            "trainer.lr={schedule: linear, start: 5.0e-4, end: 0.0, steps: 2}",
            f"model.path={tiny_policy}",
        ],
    )
    controller = Controller(config, tmp_path / "run")
    probe = Renderer.from_pretrained(str(tiny_policy)).prompt([{"role": "user", "content": "Tom has 3 coins and finds 4 more."}])
    checks = []

    def compare_logprobs(step, workers):
        assert not non_loopback_connections(), "a run's own cluster must keep its traffic on loopback"
        checks.append((step, workers.weight_sync.version, _engine_trainer_gap(workers, probe)))
        # The startup objects of the driver and of the engine actors are out of the collector's view.
        frozen.append([gc.get_freeze_count(), *ray.get([e.__ray_call__.remote(lambda _: gc.get_freeze_count()) for e in workers.engines.engines])])

    frozen = []
    summary = controller.run(str(tiny_policy), on_step=compare_logprobs, workers=tiny_workers)
    assert all(count > 0 for counts in frozen for count in counts), frozen
    assert gc.get_freeze_count() == 0, "a run unfreezes the driver's heap as it ends"

    assert summary.weight_version == 2
    assert [(step, version) for step, version, _ in checks] == [(1, 1), (2, 2)]
    assert all(diff < 1e-3 for _, _, diff in checks), checks

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert "eval_accuracy" in rows[0] and "eval_accuracy" in rows[-1]
    for row in rows[1:]:
        for key in ("reward_mean", "response_len_mean", "truncated_frac", "loss", "weight_version",
                    "logprob_diff_mean", "time_rollout_s", "time_reward_s", "time_train_s", "time_weight_sync_s"):
            assert key in row, key
        assert row["logprob_diff_mean"] < 1e-3
        assert row["temperature"] == pytest.approx({1: 1.0, 2: 0.8}[row["step"]])
        assert row["lr"] == pytest.approx({1: 5e-4, 2: 2.5e-4}[row["step"]])
        assert 0 <= row["zero_gradient_frac"] < 1
        # Each step's rollouts come from the previous step's weights.
        assert row["rollout_weight_version"] == row["weight_version"] - 1
    assert (tmp_path / "run" / "reward.png").stat().st_size > 0
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    _check_final_model(tmp_path / "run" / "final", tiny_workers)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the compiled model of a CPU engine")
@pytest.mark.parametrize(("dtype", "tolerance"), [
    ("float32", 1e-3),
    # vLLM's AMX kernel for 16-bit weights: packed differently from the oneDNN one of float32.
    pytest.param("bfloat16", 0.05, marks=pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(), reason="needs AMX")),
])
def test_a_compiled_cpu_engine_generates_with_the_weights_of_each_update(tiny_policy, ray_cluster, tmp_path, dtype, tolerance):
    """vLLM compiles its CPU model around the packed weights; updates must reach it."""
    config = load_config(None, ["steps=2", "data.prompts_per_step=2", "rollout.n_samples=2", "data.eval_size=4",
                                "data.eval_every=2", "trainer.data_parallel_size=1",
                                *TINY_WORKERS, "rollout.enforce_eager=false", f"model.path={tiny_policy}", f"model.dtype={dtype}"])
    probe = Renderer.from_pretrained(str(tiny_policy)).prompt([{"role": "user", "content": "Tom has 3 coins and finds 4 more."}])
    gaps = []

    def compare_logprobs(step, workers):
        gaps.append(_engine_trainer_gap(workers, probe))

    assert Controller(config, tmp_path / "run").run(str(tiny_policy), on_step=compare_logprobs).weight_version == 2
    assert len(gaps) == 2 and all(gap < tolerance for gap in gaps), gaps
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["logprob_diff_mean"] < tolerance for row in rows[1:])


@pytest.mark.parametrize(
    ("overrides", "leaves_out"),
    [([], True), (["trainer.skip_zero_advantage=false"], False), (["trainer.optimizer_steps_per_batch=2"], False),
     (["trainer.qk_clip_threshold=100"], False)],
)
def test_zero_advantage_samples_leave_the_batch_only_where_that_changes_nothing(tmp_path, overrides, leaves_out):
    from trainer_helpers import samples

    controller = Controller(load_config(None, ["data.eval_size=4", *overrides]), tmp_path)
    batch = samples(4, 50, advantages=[0.0, 1.0, 0.0, -1.0])
    kept, skipped_units = controller._without_zero_gradients(batch)
    assert (kept, skipped_units) == (([batch[1], batch[3]], 2) if leaves_out else (batch, 0.0))


def _engine_trainer_gap(workers, probe: list[int]) -> float:
    """The largest difference between engine 0's and the trainer's logprobs of `probe` and four more tokens."""
    sequence = probe + [20, 21, 22, 23]
    engine = torch.tensor(workers.engines.sequence_logprobs(0, sequence))
    trainer = torch.tensor(workers.trainers.logprobs(sequence))
    return (engine - trainer).abs().max().item()


def non_loopback_connections() -> list:
    """TCP and UDP sockets of this process and everything it started (Ray, engines, trainer ranks)
    that talk to, or listen on, an address off loopback."""
    import ipaddress

    import psutil

    def off_loopback(address) -> bool:
        if not address or address.ip in ("0.0.0.0", "::"):
            return False
        ip = ipaddress.ip_address(address.ip.split("%")[0])
        return not (getattr(ip, "ipv4_mapped", None) or ip).is_loopback

    found = []
    for process in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            found += [(process.pid, c.laddr, c.raddr) for c in process.net_connections("inet") if off_loopback(c.laddr) or off_loopback(c.raddr)]
        except psutil.Error:
            continue
    return found


def _check_final_model(final_dir, workers):
    """The final directory loads in transformers, with the trainer's weights and the chat template.
    (That it loads in a fresh vLLM engine: tests/test_critic.py, which serves a run's final model.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rl.trainer.logprobs import token_logprobs

    model = AutoModelForCausalLM.from_pretrained(final_dir)
    tokenizer = AutoTokenizer.from_pretrained(final_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Ana has 5 pens."}], add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    with torch.no_grad():
        saved = token_logprobs(model(torch.tensor([ids])).logits, torch.tensor([ids]), 1.0)[0]
    torch.testing.assert_close(saved, torch.tensor(workers.trainers.logprobs(ids)), rtol=0, atol=1e-4)
