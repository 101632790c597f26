"""configs/cpu_tp2_2engines.yaml for real, on the session's cluster of two nodes: a tensor-parallel
trainer with a rank on each node, a vLLM engine on each node fed by that node's weight-sync writer in
buckets smaller than the largest tensor, and engines killed mid-run."""

import json
from pathlib import Path

import pytest
import torch

from rewards import RewardScorer
from rl.cluster.engine_pool import EngineStartError
from rl.cluster.workers import Workers
from rl.config import ConfigError, load_config
from rl.loop import Controller
from rl.records import Task
from rollout.manager import RolloutManager
from rollout.rendering import Renderer

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
            "weight_sync.bucket_mb=0.05",  # 52 KB: smaller than the embedding and the head
            "weight_sync.timeout_s=60",
            # The logprob-gap bounds below are float32's; auto would pick bfloat16 on a CPU with AMX.
            "model.dtype=float32",
            f"model.path={tiny_policy}",
        ],
    )
    assert (config.trainer.tensor_parallel_size, config.rollout.num_engines) == (2, 2)
    renderer = Renderer.from_pretrained(str(tiny_policy))
    sequence = renderer.prompt(_task(3).messages) + [20, 21, 22, 23]
    checks, restarts, nodes = [], [], {}

    def engine_gaps(workers):
        trainer = torch.tensor(workers.trainers.logprobs(sequence))
        return [(torch.tensor(workers.engines.sequence_logprobs(i, sequence)) - trainer).abs().max().item()
                for i in range(len(workers.engines))]

    def after_step(step, workers):
        # One trainer rank and one engine on each node (which node gets rank 0 is Ray's choice).
        nodes.update(trainers=workers.trainers.node_ids(), engines=workers.engines.node_ids())
        checks.extend((step, workers.weight_sync.version, gap) for gap in engine_gaps(workers))
        if step == 1:
            # The samples of a group run on one engine, whose prefix cache then holds their prompt:
            # each sample after the group's first reads its full blocks from it.
            tasks = [_task(4817), _task(5923)]
            rollout = RolloutManager(config, workers.engines, renderer, RewardScorer(0))
            try:
                groups = rollout.collect(tasks, step=50, temperature=1.0, policy_version=workers.weight_sync.version).groups
            finally:
                rollout.close()
            for task, group in zip(tasks, groups.values()):
                shared = 32 * ((len(renderer.prompt(task.messages)) - 1) // 32)
                assert shared > 0 and sorted(t.cached_prompt_tokens for t in group) == [0, shared, shared, shared]
            # Engine 1 dies as an update begins: its node's writer stops waiting for it (a writer
            # that waited out weight_sync.timeout_s would fail the push), and engine 1 is restarted
            # and gets that same version. (An engine that dies mid-rollout: tests/test_rollout.py.)
            ray_cluster.kill(workers.engines.engines[1])
            assert workers.weight_sync.push(1) == 1
            restarts.append(list(workers.engines.restarts))
            assert max(engine_gaps(workers)) < 1e-3
        if step == 2:
            # An engine that dies more often than rollout.max_engine_restarts allows ends the run clearly.
            # The pool's own config: the run resolved the test's (its auto keys) into a new one.
            workers.engines.config.rollout.max_engine_restarts = 1
            ray_cluster.kill(workers.engines.engines[0])
            workers.engines.restarts[0] = 1
            rollout = RolloutManager(config, workers.engines, renderer, RewardScorer(0))
            try:
                with pytest.raises(EngineStartError, match="rollout engine 0 died and rollout.max_engine_restarts=1"):
                    rollout.collect([_task(1), _task(2)], step=100, temperature=1.0, policy_version=workers.weight_sync.version)
            finally:
                rollout.close()

    summary = Controller(config, tmp_path / "run").run(str(tiny_policy), on_step=after_step)

    assert summary.weight_version == 2
    assert len(set(nodes["trainers"])) == 2 and nodes["engines"] == nodes["trainers"], nodes
    assert restarts == [[0, 1]]
    assert [(step, version) for step, version, _ in checks] == [(1, 1), (1, 1), (2, 2), (2, 2)]
    assert all(diff < 1e-3 for _, _, diff in checks), checks
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["logprob_diff_mean"] < 1e-3 and "max_attention_logit" in row and row["prefix_cache_hit_frac"] > 0.5 for row in rows[1:])


def test_a_mesh_that_cannot_split_the_model_fails_before_any_process_starts(tiny_policy, ray_cluster):
    overrides = ["trainer.data_parallel_size=1", "trainer.tensor_parallel_size=3", f"model.path={tiny_policy}"]
    config = load_config(None, overrides)
    with pytest.raises(ConfigError, match="tensor_parallel_size=3 does not divide the model's num_attention_heads=2"):
        Workers.start(config, str(tiny_policy))


def test_an_engine_on_a_node_without_a_trainer_rank_gets_its_weights_through_a_relay(tiny_policy, ray_cluster, monkeypatch):
    # Disaggregated GPU placement can pack the engines onto nodes of their own. On CPU an engine
    # always shares a trainer rank's bundle, so here the placement sends the one engine to the
    # session's other node, where the one trainer rank is not.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from rl.cluster.placement import Placement

    def engines_on_the_other_node(self):
        trainer_nodes = set(ray_cluster.util.placement_group_table(self.group)["bundles_to_node_id"].values())
        other = next(node["NodeID"] for node in ray_cluster.nodes() if node["Alive"] and node["NodeID"] not in trainer_nodes)
        return [other] * self.num_engines

    monkeypatch.setattr(Placement, "engine_nodes", engines_on_the_other_node)
    monkeypatch.setattr(Placement, "engine_options", lambda self, index: {
        "num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(self.engine_nodes()[index], soft=False)})
    config = load_config(None, [
        f"model.path={tiny_policy}", "trainer.data_parallel_size=1", "rollout.num_engines=1", "rollout.cpu_threads=1",
        "rollout.enforce_eager=true", "model.dtype=float32", "weight_sync.timeout_s=60",
        "weight_sync.bucket_mb=1",  # a few buckets, through both slots of the relay's block
    ])
    sequence = Renderer.from_pretrained(str(tiny_policy)).prompt(_task(3).messages) + [20, 21, 22, 23]

    def engine_gap(workers):
        trainer = torch.tensor(workers.trainers.logprobs(sequence))
        return (torch.tensor(workers.engines.sequence_logprobs(0, sequence)) - trainer).abs().max().item()

    workers = Workers.start(config, str(tiny_policy))
    try:
        [engine_node] = workers.engines.node_ids()
        assert engine_node not in workers.trainers.node_ids() and list(workers.weight_sync.relays) == [engine_node]
        block = Path("/dev/shm") / workers.weight_sync.plan.block_on(engine_node)
        # The engine started with random weights: after the update it computes what the trainer does.
        assert workers.weight_sync.push(1) == 1 and engine_gap(workers) < 1e-3
        # The engine dies as an update begins: its relay stops waiting for it, and the restarted
        # engine gets the same version through the relay.
        ray_cluster.kill(workers.engines.engines[0])
        assert workers.weight_sync.push(2) == 2
        assert workers.engines.restarts == [1] and engine_gap(workers) < 1e-3
        assert block.exists()
    finally:
        workers.shutdown()
    assert not block.exists()
