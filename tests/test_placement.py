"""The layout a run is given: trainer ranks and engines per model, torch threads on CPU, and how many requests an engine batches."""

import pytest

from rl.cluster.placement import Placement, shared_cores
from rl.config import ConfigError, load_config


def test_an_engine_shares_its_nodes_cores_with_the_engines_there():
    engine_nodes = ["a", "b", "a"]
    cores = {"a": 4, "b": 2}
    assert [shared_cores(engine_nodes, cores, index) for index in range(3)] == [2, 2, 2]
    assert shared_cores(["a", "a", "a"], {"a": 2}, 0) == 1


def test_engine_threads_follow_the_config_or_the_node(ray_cluster, tiny_policy):
    for overrides, expected in (([], [1, 1]), (["rollout.cpu_threads=3"], [3, 3])):
        placement = Placement(load_config(None, [f"model.path={tiny_policy}", "trainer.data_parallel_size=2", "rollout.num_engines=2", *overrides]))
        try:
            # The session's nodes declare one CPU each, and the two engines land on different nodes.
            assert [placement.engine_cpu_threads(index) for index in range(2)] == expected
        finally:
            placement.release()


def test_an_engine_batches_as_many_requests_as_the_rollout_runs_at_once(tiny_policy, monkeypatch):
    """vLLM's async engine would batch 128 requests by default: a 200-prompt evaluation in two waves."""
    import os

    import torch._dynamo
    from vllm import AsyncEngineArgs

    from rl.cluster.engine_pool import run_engine_spec
    from rl.cluster.placement import resolve_layout
    from rollout.engine import engine_arguments

    # engine_arguments sets what an engine's process reads; this process keeps its own settings.
    monkeypatch.setattr(os, "environ", dict(os.environ))
    monkeypatch.setattr(torch._dynamo.config, "disable", torch._dynamo.config.disable)
    config = resolve_layout(load_config(None, [f"model.path={tiny_policy}", "rollout.max_concurrent_episodes=300"]), str(tiny_policy))
    spec = run_engine_spec(config, str(tiny_policy), sleep_between_rollouts=False)
    assert AsyncEngineArgs(**engine_arguments(spec)).create_engine_config().scheduler_config.max_num_seqs == 300


def test_auto_dtype_is_bfloat16_where_the_devices_multiply_in_it(monkeypatch):
    """GPUs (in the Ray cluster, or locally outside Ray), or a CPU with AMX tiles; every other CPU keeps float32."""
    import ray
    import torch

    from rl.cluster.placement import resolve_dtype

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for in_ray in (False, True):
        monkeypatch.setattr(ray, "is_initialized", lambda in_ray=in_ray: in_ray)
        for gpus, amx, expected in ((0, False, "float32"), (0, True, "bfloat16"), (1, False, "bfloat16")):
            monkeypatch.setattr(ray, "cluster_resources", lambda gpus=gpus: {"CPU": 2, "GPU": gpus} if gpus else {"CPU": 2})
            if not in_ray:
                monkeypatch.setattr(torch.cuda, "device_count", lambda gpus=gpus: gpus)
            monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
            assert resolve_dtype(load_config()).model.dtype == expected, (in_ray, gpus, amx)
    for chosen in ("float32", "bfloat16", "float16"):
        assert resolve_dtype(load_config(None, [f"model.dtype={chosen}"])).model.dtype == chosen


def test_auto_engines_on_cpu_are_compiled_two_for_a_small_model_and_one_for_a_large_one():
    from rl.cluster.placement import LARGE_MODEL_PARAMETERS, engine_layout

    assert engine_layout(0, 2, 1, False, LARGE_MODEL_PARAMETERS - 1) == (2, False)
    assert engine_layout(0, 2, 1, False, LARGE_MODEL_PARAMETERS) == (1, False)


def test_auto_trainer_ranks_are_two_on_cpu_for_a_small_model_one_for_a_large_one_and_two_on_gpu():
    from rl.cluster.placement import LARGE_MODEL_PARAMETERS, trainer_ranks

    assert trainer_ranks(0, LARGE_MODEL_PARAMETERS - 1) == 2
    assert trainer_ranks(0, LARGE_MODEL_PARAMETERS) == 1
    assert trainer_ranks(8, LARGE_MODEL_PARAMETERS) == 2


def test_auto_engines_take_the_gpus_the_trainer_leaves():
    from rl.cluster.placement import engine_layout

    assert engine_layout(8, 4, 2, False, 10**9) == (2, True)
    assert engine_layout(8, 6, 1, False, 10**6) == (2, True)
    # Colocated, engine i shares device i with trainer rank i.
    assert engine_layout(4, 4, 1, True, 10**9) == (4, True)
    # Too few GPUs left: one engine, and the placement's check names what is missing.
    assert engine_layout(1, 1, 1, False, 10**6) == (1, True)


def test_auto_layout_resolves_for_the_model_and_chosen_values_stay(tiny_policy, tmp_path, monkeypatch):
    """The bench's large model (60 M parameters) gets one trainer rank and one compiled engine on CPU, the tiny policy two of each."""
    import ray
    import torch

    from rl.bench import large_config
    from rl.cluster.placement import resolve_layout

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    large_config(tiny_policy).save_pretrained(tmp_path)

    def layout(model, *overrides):
        config = resolve_layout(load_config(None, [f"model.path={model}", *overrides]), str(model))
        return config.trainer.data_parallel_size, config.rollout.num_engines, config.rollout.enforce_eager

    assert layout(tiny_policy) == (2, 2, False)
    assert layout(tmp_path) == (1, 1, False)
    assert layout(tmp_path, "rollout.num_engines=3") == (1, 3, False)
    assert layout(tmp_path, "rollout.enforce_eager=true", "trainer.data_parallel_size=2") == (2, 1, True)
    # A batch that auto's two ranks cannot split is refused once they are chosen.
    with pytest.raises(ConfigError, match="= 9 trajectories does not divide into trainer.data_parallel_size"):
        layout(tiny_policy, "data.prompts_per_step=3", "rollout.n_samples=3")
    assert layout(tmp_path, "data.prompts_per_step=3", "rollout.n_samples=3")[0] == 1
