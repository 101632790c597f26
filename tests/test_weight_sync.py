"""Weight sync's planning and hand-over, with the writer and readers in threads."""

import asyncio
import dataclasses
import threading
import uuid
from contextlib import contextmanager

import pytest
import torch

from rl.weight_sync.transport import (
    BucketReader,
    BucketViews,
    BucketWriter,
    WeightSyncError,
    WeightUpdate,
    layout_of,
    plan_buckets,
)

NODE = "test-node"

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def _state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (64, 16)}
    for layer in range(2):
        prefix = f"model.layers.{layer}"
        shapes |= {
            f"{prefix}.self_attn.q_proj.weight": (16, 16),
            f"{prefix}.self_attn.q_proj.bias": (16,),
            f"{prefix}.self_attn.k_proj.weight": (16, 16),
            f"{prefix}.self_attn.k_proj.bias": (16,),
            f"{prefix}.self_attn.v_proj.weight": (16, 16),
            f"{prefix}.self_attn.v_proj.bias": (16,),
            f"{prefix}.self_attn.o_proj.weight": (16, 16),
            f"{prefix}.mlp.gate_proj.weight": (32, 16),
            f"{prefix}.mlp.up_proj.weight": (32, 16),
            f"{prefix}.mlp.down_proj.weight": (16, 32),
            f"{prefix}.input_layernorm.weight": (16,),
        }
    shapes["lm_head.weight"] = (64, 16)
    state = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    state["model.norm.weight"] = torch.ones(16, dtype=torch.bfloat16)
    return state


def _plan(state, bucket_bytes: int, readers: int = 2):
    return plan_buckets(layout_of(state), PACKED, bucket_bytes, readers, f"k2rl-test-{uuid.uuid4().hex[:8]}")


def test_buckets_keep_vllm_load_groups_whole_and_fit_the_size():
    state = _state()
    plan = _plan(state, bucket_bytes=3000)
    assert sorted(plan.names) == sorted(state)
    group_of = {}
    for bucket in plan.buckets:
        for tensor in bucket.tensors:
            module = tensor.name.rsplit(".", 1)[0]
            key = module.replace("q_proj", "qkv").replace("k_proj", "qkv").replace("v_proj", "qkv")
            key = key.replace("gate_proj", "gate_up").replace("up_proj", "gate_up")
            group_of.setdefault(key, set()).add(bucket.index)
    assert all(len(buckets) == 1 for buckets in group_of.values()), group_of
    # The embedding (4096 bytes) and q, k, v with biases (3 x 1088 bytes) are larger than a bucket:
    # each group gets a bucket of its own.
    oversized = [[t.name.rsplit(".", 2)[1] for t in b.tensors] for b in plan.buckets if b.nbytes > 3000]
    assert oversized[:2] == [["embed_tokens"], ["q_proj", "q_proj", "k_proj", "k_proj", "v_proj", "v_proj"]]
    assert plan.slot_bytes == max(b.nbytes for b in plan.buckets)


def test_bucket_size_must_be_positive():
    with pytest.raises(ValueError, match="bucket size must be > 0"):
        _plan(_state(), bucket_bytes=0)


@contextmanager
def _writer(local_readers=(0, 1)):
    """The test state, a plan of 1 KB buckets (smaller than the largest tensor) and its writer."""
    state = _state()
    plan = _plan(state, bucket_bytes=1024)
    writer = BucketWriter(plan, NODE, local_readers=local_readers)
    try:
        yield state, plan, writer
    finally:
        writer.close()


def _in_plan_order(plan, state):
    return ((name, state[name]) for name in plan.names)


def _transfer(plan, update, readers, seen):
    """Run the writer and one reader thread per engine; each reader copies what it loads."""
    errors = []

    def reader_thread(index):
        views, reader = BucketViews(plan, NODE), BucketReader(plan, NODE, index)

        async def load(bucket):
            seen[index].update({n: t.clone() for n, t in views.bucket(bucket)})

        try:
            asyncio.run(reader.read(update, load))
        except Exception as error:  # noqa: BLE001 - reported to the test below
            errors.append(error)
        finally:
            views.close()
            reader.close()

    threads = [threading.Thread(target=reader_thread, args=(index,)) for index in readers]
    for thread in threads:
        thread.start()
    return threads, errors


def test_every_reader_receives_every_version_through_two_slots():
    threads_before = torch.get_num_threads()
    with _writer() as (state, plan, writer):
        assert len(plan.buckets) > 4
        for version in (1, 2):
            new = {name: t * version for name, t in state.items()}
            update = WeightUpdate(plan, version, version, (0, 1), timeout_s=30)
            seen = {0: {}, 1: {}}
            threads, errors = _transfer(plan, update, (0, 1), seen)
            writer.write(update, _in_plan_order(plan, new))
            for thread in threads:
                thread.join()
            assert not errors, errors
            for reader in (0, 1):
                assert seen[reader].keys() == new.keys()
                assert all(torch.equal(seen[reader][n], new[n]) for n in new)
        assert torch.get_num_threads() == threads_before  # the writer's copy threads are given back


def test_a_replacement_reader_does_not_inherit_its_predecessors_progress():
    with _writer() as (state, plan, writer):
        first = WeightUpdate(plan, 1, 1, (0,), timeout_s=30)
        threads, errors = _transfer(plan, first, (0,), {0: {}})
        writer.write(first, _in_plan_order(plan, state))
        threads[0].join()
        # The same version again for a restarted engine 0: a new update id, so the writer waits for
        # the new reader's own progress; a writer that trusted the old marks would fail this.
        again = WeightUpdate(plan, 2, 1, (0,), timeout_s=30)
        seen = {0: {}}
        threads, errors = _transfer(plan, again, (0,), seen)
        writer.write(again, _in_plan_order(plan, state))
        threads[0].join()
        assert not errors and all(torch.equal(seen[0][n], state[n]) for n in state)


def test_a_reader_that_stops_loading_is_named_in_the_writers_error():
    with _writer() as (state, plan, writer):
        update = WeightUpdate(plan, 1, 7, (0, 1), timeout_s=0.5)
        # Engine 0 would wait far longer than the writer: what ends its wait is the abort.
        patient = dataclasses.replace(update, timeout_s=30)
        threads, errors = _transfer(plan, patient, (0,), {0: {}})  # engine 1 never reads
        with pytest.raises(WeightSyncError, match="version 7: rollout engine 1 did not load bucket 0 within weight_sync.timeout_s"):
            writer.write(update, _in_plan_order(plan, state))
        threads[0].join()
        # The writer's failure aborts the update for the readers that were waiting: no hang.
        assert errors and "aborted" in str(errors[0])


def test_a_reader_without_a_writer_times_out_naming_the_bucket():
    with _writer() as (state, plan, writer):
        update = WeightUpdate(plan, 1, 3, (0,), timeout_s=0.3)
        threads, errors = _transfer(plan, update, (0,), {0: {}})
        threads[0].join()
        assert "version 3: bucket 0 was not written within weight_sync.timeout_s=0.3s" in str(errors[0])


def test_the_writer_goes_on_without_an_engine_that_died():
    with _writer() as (state, plan, writer):
        update = WeightUpdate(plan, 1, 4, (0, 1), timeout_s=30)
        seen = {0: {}}
        threads, errors = _transfer(plan, update, (0,), seen)
        writer.mark_reader_failed(1, update.update_id)  # what the node's writer does for a dead engine
        writer.write(update, _in_plan_order(plan, state))
        threads[0].join()
        assert not errors and all(torch.equal(seen[0][n], state[n]) for n in state)


def test_a_nodes_writer_waits_only_for_the_engines_of_its_node():
    with _writer(local_readers=(0,)) as (state, plan, writer):  # engine 1 loads from another node's block
        update = WeightUpdate(plan, 1, 2, (0, 1), timeout_s=30)
        seen = {0: {}}
        threads, errors = _transfer(plan, update, (0,), seen)
        writer.write(update, _in_plan_order(plan, state))
        threads[0].join()
        assert not errors and all(torch.equal(seen[0][n], state[n]) for n in state)


def test_each_node_with_engines_gets_its_first_trainer_rank_or_a_relay_as_writer():
    from rl.weight_sync.sync import writer_layout

    assert writer_layout(["a", "a"], ["a", "a"]) == ({0: (0, 1)}, {})
    assert writer_layout(["a", "a", "b", "b"], ["b", "a", "b"]) == ({2: (0, 2), 0: (1,)}, {})
    assert writer_layout(["a", "b"], ["a", "c", "d", "c"]) == ({0: (0,)}, {"c": (1, 3), "d": (2,)})


def test_each_node_has_a_block_of_its_own():
    plan = _plan(_state(), bucket_bytes=1024)
    first, second = BucketWriter(plan, "node-a", (0,)), BucketWriter(plan, "node-b", (1,))
    try:
        assert plan.block_on("node-a") != plan.block_on("node-b")
    finally:
        first.close()
        second.close()


def test_weight_sync_bench_times_updates_into_real_engines_against_memcpy(ray_cluster):
    from rl.weight_sync.bench import run_weight_sync_bench

    bench = run_weight_sync_bench(params=2_000_000, engines=2, bucket_mb=1, repeats=1)
    assert bench.engines == 2 and bench.buckets > 2
    for timing in (bench.memcpy, bench.one_engine, bench.all_engines):
        assert timing.seconds > 0 and timing.gb_per_s == pytest.approx(bench.gigabytes / timing.seconds)
    assert bench.one_engine.ratio_to_memcpy == pytest.approx(bench.one_engine.seconds / bench.memcpy.seconds)
    assert bench.all_engines_vs_one == pytest.approx(bench.all_engines.seconds / bench.one_engine.seconds)
    assert "2 engines / 1 engine" in bench.describe()
