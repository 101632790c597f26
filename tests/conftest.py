"""Shared fixtures: one tiny policy and one Ray cluster per test session (the machine has 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    import ray

    from rl.cluster.ray_session import connect

    connect()
    yield ray
    ray.shutdown()
