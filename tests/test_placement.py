"""How many torch threads each engine gets on CPU."""

from rl.cluster.placement import Placement, shared_cores
from rl.config import load_config


def test_an_engine_shares_its_nodes_cores_with_the_engines_there():
    engine_nodes = ["a", "b", "a"]
    cores = {"a": 4, "b": 2}
    assert [shared_cores(engine_nodes, cores, index) for index in range(3)] == [2, 2, 2]
    assert shared_cores(["a", "a", "a"], {"a": 2}, 0) == 1


def test_engine_threads_follow_the_config_or_the_node(ray_cluster, tiny_policy):
    for overrides, expected in (([], [1, 1]), (["rollout.cpu_threads=3"], [3, 3])):
        placement = Placement(load_config(None, [f"model.path={tiny_policy}", "rollout.num_engines=2", *overrides]))
        try:
            # The session's nodes declare one CPU each, and the two engines land on different nodes.
            assert [placement.engine_cpu_threads(index) for index in range(2)] == expected
        finally:
            placement.release()
