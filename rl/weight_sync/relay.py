"""A node's weight-sync writer where no trainer rank runs.

Disaggregated on GPU, Ray may place the engines on nodes of their own. Each such node gets a
`WeightRelay` actor that stands in for the trainer rank a node would otherwise have: the first
trainer rank sends it each bucket, once gathered, through Ray's object store (`send_to_relays`),
and the relay writes it into its node's shared-memory block for the engines there, slot by slot,
exactly as a trainer rank writes for the engines of its own node (transport.py). At most
`NUM_SLOTS` buckets per relay are on their way at once, so an update holds no more than that in
the object store.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator

import ray
import torch

from rl.weight_sync.transport import NUM_SLOTS, BucketPlan, BucketWriter, WeightSyncError, WeightUpdate


class WeightRelay:
    """Run as a Ray actor on its node (`start_relay`); owns the node's shared-memory block."""

    def __init__(self, plan: BucketPlan, local_readers: tuple[int, ...]):
        self.writer = BucketWriter(plan, ray.get_runtime_context().get_node_id(), local_readers)
        self._buckets: queue.Queue[tuple[int, int, list[tuple[str, torch.Tensor]]]] = queue.Queue(maxsize=NUM_SLOTS)

    @ray.method(concurrency_group="write")
    def write(self, update: WeightUpdate) -> None:
        """Write `update` for this node's engines as its buckets arrive (`receive`)."""
        self.writer.write(update, self._arriving(update))

    def _arriving(self, update: WeightUpdate) -> Iterator[tuple[str, torch.Tensor]]:
        for bucket in update.plan.buckets:
            while True:
                try:
                    update_id, index, tensors = self._buckets.get(timeout=update.timeout_s)
                except queue.Empty:
                    raise WeightSyncError(
                        f"weight update to version {update.version}: bucket {bucket.index} did not reach the weight "
                        f"relay within weight_sync.timeout_s={update.timeout_s:g}s (is the first trainer rank alive?)"
                    ) from None
                # What is left of an update that failed part-way is passed over.
                if update_id == update.update_id:
                    break
            if index != bucket.index:
                raise WeightSyncError(f"the weight relay received bucket {index} where it expected bucket {bucket.index}")
            yield from tensors

    @ray.method(concurrency_group="receive")
    def receive(self, update_id: int, index: int, tensors: list[tuple[str, torch.Tensor]]) -> None:
        """Bucket `index` of update `update_id`; waits while `NUM_SLOTS` buckets wait to be written."""
        self._buckets.put((update_id, index, tensors))

    @ray.method(concurrency_group="control")
    def mark_reader_failed(self, reader: int, update_id: int) -> None:
        self.writer.mark_reader_failed(reader, update_id)

    def close(self) -> None:
        self.writer.close()


def start_relay(plan: BucketPlan, node_id: str, local_readers: tuple[int, ...]):
    """A `WeightRelay` actor pinned to `node_id`, for the engines `local_readers` there. Its write,
    the buckets it receives meanwhile, and an engine's failure each run in a thread of their own."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return ray.remote(concurrency_groups={"write": 1, "receive": 1, "control": 1})(WeightRelay).options(
        num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(plan, local_readers)


def send_to_relays(relays: list, update: WeightUpdate, full_tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass the gathered tensors on unchanged, and send each bucket, once whole, to every relay."""
    in_flight: list[list] = []
    for bucket in update.plan.buckets:
        tensors = []
        for _ in bucket.tensors:
            name, value = next(full_tensors)
            yield name, value
            tensors.append((name, value.detach().cpu()))
        if len(in_flight) == NUM_SLOTS:
            ray.get(in_flight.pop(0))
        in_flight.append([relay.receive.remote(update.update_id, bucket.index, tensors) for relay in relays])
    ray.get([call for calls in in_flight for call in calls])
