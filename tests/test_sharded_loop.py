"""configs/cpu_tp2_2engines.yaml for real: a tensor-parallel trainer, two vLLM engines fed by the
checkpoint engine in buckets smaller than the largest tensor, and an engine killed mid-run."""

import json
import time
from pathlib import Path

import pytest
import torch

from rl.config import ConfigError, load_config
from rl.controller import Cluster, Controller, EngineStartError
from rl.records import Task
from rollout.engine import SamplingSpec

pytestmark = pytest.mark.integration

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cpu_tp2_2engines.yaml"


def _task(i: int) -> Task:
    question = f"Ana has {i} pens and buys {i + 1} more. How many pens does she have?"
    return Task(f"t{i}", ({"role": "user", "content": question},), "arithmetic", "math", {"answer": str(2 * i + 1)})


def test_tp2_trainer_two_engines_and_an_engine_restart(tiny_policy, ray_cluster, tmp_path):
    config = load_config(
        CONFIG,
        [
            "steps=2",
            "data.prompts_per_step=4",
            "rollout.n_samples=4",
            "data.eval_size=8",
            "data.eval_every=1",
            "trainer.micro_batch_size=4",
            "trainer.qk_clip_threshold=50.0",
            "checkpoint.bucket_mb=0.05",  # 52 KB: smaller than the embedding and the head
            "checkpoint.timeout_s=60",
            f"model.path={tiny_policy}",
        ],
    )
    assert (config.trainer.tensor_parallel_size, config.rollout.num_engines) == (2, 2)
    probe = _task(3)
    checks, restarts = [], []

    def after_step(step, cluster):
        sequence = ray_cluster.get(cluster.engines[0].render.remote(probe)) + [20, 21, 22, 23]
        trainer = torch.tensor(cluster.trainer_logprobs(sequence))
        for engine in cluster.engines:
            got = torch.tensor(ray_cluster.get(engine.sequence_logprobs.remote(sequence)))
            checks.append((step, cluster.weight_version, (got - trainer).abs().max().item()))
        if step == 1:
            # Engine 1 dies; the next generate restarts it at the current version, and its share
            # of the tasks is generated again: each task comes back exactly n times, in order.
            ray_cluster.kill(cluster.engines[1])
            tasks = [_task(i) for i in range(6)]
            sampling = [SamplingSpec(n=2, temperature=1.0, top_p=1.0, max_tokens=8) for _ in tasks]
            out = cluster.generate(tasks, sampling)
            restarts.append(list(cluster.engine_restarts))
            assert [t.task.task_id for t in out] == [task.task_id for task in tasks for _ in range(2)]
            assert {t.weight_version for t in out} == {cluster.weight_version}
            restarted = torch.tensor(ray_cluster.get(cluster.engines[1].sequence_logprobs.remote(sequence)))
            assert (restarted - trainer).abs().max().item() < 1e-3
            # Engine 0 dies as an update begins: the writer stops waiting for it at once (well
            # within checkpoint.timeout_s), engine 0 is restarted and gets that same version.
            ray_cluster.kill(cluster.engines[0])
            started = time.monotonic()
            assert cluster.sync_weights() == 2
            assert time.monotonic() - started < config.checkpoint.timeout_s
            restarts.append(list(cluster.engine_restarts))
            for engine in cluster.engines:
                got = torch.tensor(ray_cluster.get(engine.sequence_logprobs.remote(sequence)))
                assert (got - trainer).abs().max().item() < 1e-3
        if step == 2:
            # An engine that dies more often than rollout.max_engine_restarts allows ends the run clearly.
            cluster.config.rollout.max_engine_restarts = 1
            ray_cluster.kill(cluster.engines[0])
            cluster.engine_restarts[0] = 1
            with pytest.raises(EngineStartError, match="rollout engine 0 died and rollout.max_engine_restarts=1"):
                cluster.generate([probe, probe], [SamplingSpec(n=1, temperature=1.0, top_p=1.0, max_tokens=4)] * 2)

    summary = Controller(config, tmp_path / "run").run(str(tiny_policy), on_step=after_step)

    assert summary.weight_version == 3
    assert restarts == [[0, 1], [1, 1]]
    assert [(step, version) for step, version, _ in checks] == [(1, 1), (1, 1), (2, 3), (2, 3)]
    assert all(diff < 1e-3 for _, _, diff in checks), checks
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["logprob_diff_mean"] < 1e-3 and "max_attention_logit" in row for row in rows[1:])


def test_a_mesh_that_cannot_split_the_model_fails_before_any_process_starts(tiny_policy, ray_cluster):
    overrides = ["trainer.data_parallel_size=1", "trainer.tensor_parallel_size=3", f"model.path={tiny_policy}"]
    config = load_config(None, overrides)
    with pytest.raises(ConfigError, match="tensor_parallel_size=3 does not divide the model's num_attention_heads=2"):
        Cluster(config, str(tiny_policy))
