"""Shared fixtures: one tiny policy, one Ray cluster of two nodes and one set of tiny workers per test
session (the machine has 2 cores)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from processes import assert_all_exit, processes_with_marker
from ray_nodes import two_node_cluster

from rl.bootstrap import BootstrapSpec, bootstrap

# A few SFT steps are enough to exercise the bootstrap path and give a model with
# the right tokenizer, chat template and architecture; its accuracy does not matter.
TINY_SPEC = BootstrapSpec(num_layers=2, sft_steps=5, eval_size=8, sft_batch_size=16)


@pytest.fixture(autouse=True)
def dataset_cache(tmp_path, monkeypatch):
    """Keep the Arrow copies that `datasets` writes for task files out of the user's Hugging Face cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("policy") / "tiny"
    bootstrap(path, TINY_SPEC)
    return path


@pytest.fixture(scope="session")
def ray_cluster():
    """The session's Ray cluster: two nodes on this machine (tests/ray_nodes.py), joined by address."""
    import ray

    from rl.cluster.ray_session import connect

    marker = uuid.uuid4().hex
    with two_node_cluster(marker) as address:
        connect(address)
        try:
            deadline = time.monotonic() + 120
            while sum(node["Alive"] for node in ray.nodes()) < 2:
                assert time.monotonic() < deadline, "the second Ray node did not join"
                time.sleep(0.5)
            yield ray
        finally:
            ray.shutdown()
    assert_all_exit(lambda: processes_with_marker(f"K2RL_TEST_RUN={marker}"), 120, "the session's Ray cluster")


# The actors of the shared `tiny_workers`: a run given them may change anything but these (and
# what Workers.serve checks). One engine of one thread, as the session's one-CPU nodes give by
# default, so that a run of the same settings on a cluster of its own samples exactly the same tokens.
# float32 on every machine: the suite's bounds on the trainer-engine logprob gap are float32's, and
# `model.dtype: auto` would pick bfloat16 on a CPU with AMX. Eager: a compiled engine starts 4-15 s
# later, which the suite's many short runs would each pay; the compiled engine of the default is
# tested on its own (test_loop.py) and by the tests that start engines of their own.
TINY_WORKERS = ["trainer.micro_batch_size=4", "rollout.max_model_len=256", "rollout.num_engines=1", "rollout.cpu_threads=1",
                "model.dtype=float32", "rollout.enforce_eager=true"]


@pytest.fixture(scope="session")
def tiny_workers(tiny_policy, ray_cluster):
    """One engine and two trainer ranks for the tiny policy, shared by the tests that need a running
    loop but not fresh weights (starting them costs half a minute here). Tests that train move the
    weights on; each run pushes the trainer's weights to the engine at its start."""
    from rl.cluster.workers import Workers
    from rl.config import load_config

    workers = Workers.start(load_config(None, [f"model.path={tiny_policy}", *TINY_WORKERS]), str(tiny_policy))
    yield workers
    workers.shutdown()
