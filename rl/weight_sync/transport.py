"""The weight-sync transport (K2's checkpoint engine): a new version of the policy goes from the
trainer ranks into every rollout engine, in place, bucket by bucket, pipelined.

For each bucket of one update:

    every trainer rank   gathers the bucket's parameters from their shards (`full_tensor()`: an
                         all-gather over the trainer mesh with torch.distributed, which is how the
                         writer of every node receives the whole bucket)
    the node's writer    (the node's first trainer rank) writes the bucket into one of two slots
                         of the node's shared-memory block
    each engine          copies the bucket from that slot into its own parameters (vLLM's weight
                         loaders take only the part their own tensor-parallel shard needs) and
                         releases the slot

With two slots, bucket i+1 is gathered and written while the engines load bucket i. An engine
takes a whole update inside one actor call, so it never generates with a mix of two versions.

Buckets never split a group of parameters that vLLM loads into one module (q/k/v into `qkv_proj`,
gate/up into `gate_up_proj`, a weight and its bias), so that a module is never half old, half new
between two buckets for longer than one bucket's load. A group larger than `bucket_bytes` gets a
bucket of its own; the slots are sized for the largest bucket.

Slots and the hand-over live in one named shared-memory block per node (its name carries the
node's id, so nodes that share a /dev/shm never collide). Its first bytes are int64 control
words: per slot, the sequence number of the bucket written into it; per engine and slot, the
sequence number of the bucket that engine finished loading from it; per engine, the id of an
update it failed; and an abort word. Each update has an id of its own, so sequence numbers never
repeat and a restarted engine cannot inherit its predecessor's progress. A control word is written
after the data it announces; x86's store order makes that enough between processes (a weaker
memory model would need a fence).
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from multiprocessing import resource_tracker, shared_memory

import torch

NUM_SLOTS = 2
_ALIGN = 64
_POLL_S = 0.0002
_CREATED_HERE: set[str] = set()  # blocks this process created (and will unlink)


class WeightSyncError(RuntimeError):
    """An update could not complete; the message names the bucket, the engine and the cause."""


@dataclass(frozen=True)
class TensorSlot:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # within the bucket's slot
    nbytes: int


@dataclass(frozen=True)
class Bucket:
    index: int
    tensors: tuple[TensorSlot, ...]
    nbytes: int


@dataclass(frozen=True)
class BucketPlan:
    """Where each tensor of the state dict travels: fixed for a run, computed once by the driver."""

    block_name: str  # the prefix of each node's block name, unique per run
    num_readers: int  # engine slots in the control area; engine i always uses reader index i
    slot_bytes: int
    buckets: tuple[Bucket, ...]

    @property
    def control_bytes(self) -> int:
        return _round_up(8 * (NUM_SLOTS + self.num_readers * NUM_SLOTS + self.num_readers + 1), _ALIGN)

    @property
    def block_bytes(self) -> int:
        return self.control_bytes + NUM_SLOTS * self.slot_bytes

    def block_on(self, node_id: str) -> str:
        """The name of the shared-memory block on node `node_id`."""
        return f"{self.block_name}-{node_id[:12]}"

    @property
    def names(self) -> list[str]:
        return [t.name for bucket in self.buckets for t in bucket.tensors]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BucketPlan:
        buckets = tuple(
            Bucket(b["index"], tuple(TensorSlot(**{**t, "shape": tuple(t["shape"])}) for t in b["tensors"]), b["nbytes"])
            for b in data["buckets"]
        )
        return cls(data["block_name"], data["num_readers"], data["slot_bytes"], buckets)


@dataclass(frozen=True)
class WeightUpdate:
    """One update: version `version` of the weights into the engines listed in `readers`."""

    plan: BucketPlan
    update_id: int  # unique per update, also when one version is sent twice (an engine restarted)
    version: int
    readers: tuple[int, ...]
    timeout_s: float

    def sequence(self, bucket: int) -> int:
        return (self.update_id << 24) | (bucket + 1)


def load_group(name: str, packed_modules: dict[str, list[str]]) -> str:
    """The vLLM module that loads the state-dict entry `name` (`...q_proj.weight` -> `...qkv_proj`)."""
    module = name.rpartition(".")[0]
    parent, _, leaf = module.rpartition(".")
    for fused, parts in packed_modules.items():
        if leaf in parts:
            leaf = fused
            break
    return f"{parent}.{leaf}" if parent else leaf


def plan_buckets(
    layout: Iterable[tuple[str, str, tuple[int, ...]]],
    packed_modules: dict[str, list[str]],
    bucket_bytes: int,
    num_readers: int,
    block_name: str,
) -> BucketPlan:
    """Pack (name, dtype, shape) entries, in order, into buckets of at most `bucket_bytes`, keeping
    each vLLM load group whole (its entries travel in the bucket of its first one). The trainer
    sends tensors in plan order, `BucketPlan.names`."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket size must be > 0 bytes, got {bucket_bytes}")
    groups: dict[str, list[tuple[str, str, tuple[int, ...], int]]] = {}
    for name, dtype, shape in layout:
        nbytes = math.prod(shape) * getattr(torch, dtype).itemsize
        groups.setdefault(load_group(name, packed_modules), []).append((name, dtype, tuple(shape), nbytes))
    buckets: list[list[tuple[str, str, tuple[int, ...], int]]] = []
    current: list = []
    current_bytes = 0
    for members in groups.values():
        size = sum(_round_up(m[3], _ALIGN) for m in members)
        if current and current_bytes + size > bucket_bytes:
            buckets.append(current)
            current, current_bytes = [], 0
        current.extend(members)
        current_bytes += size
    if current:
        buckets.append(current)
    planned = []
    for index, members in enumerate(buckets):
        tensors, offset = [], 0
        for name, dtype, shape, nbytes in members:
            tensors.append(TensorSlot(name, dtype, shape, offset, nbytes))
            offset += _round_up(nbytes, _ALIGN)
        planned.append(Bucket(index, tuple(tensors), offset))
    # A slot holds the largest bucket: at most `bucket_bytes`, unless one group alone is larger.
    slot_bytes = max((bucket.nbytes for bucket in planned), default=_ALIGN)
    return BucketPlan(block_name, num_readers, slot_bytes, tuple(planned))


class _Block:
    """The shared-memory block of a plan on one node: control words and the slots."""

    def __init__(self, plan: BucketPlan, node_id: str, create: bool):
        self.plan = plan
        self.name = plan.block_on(node_id)
        if create:
            free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else plan.block_bytes
            if free < plan.block_bytes:
                raise WeightSyncError(
                    f"weight sync needs {plan.block_bytes / 2**30:.2f} GiB of shared memory, /dev/shm has "
                    f"{free / 2**30:.2f} GiB free (lower weight_sync.bucket_mb, or in Docker raise --shm-size)"
                )
        self.shm = shared_memory.SharedMemory(name=self.name, create=create, size=plan.block_bytes if create else 0)
        if create:
            _CREATED_HERE.add(self.name)
        elif self.name not in _CREATED_HERE:
            # Python 3.11 registers attached blocks for cleanup too; only the creator may unlink.
            resource_tracker.unregister(self.shm._name, "shared_memory")  # noqa: SLF001
        words = plan.control_bytes // 8
        self.control = torch.frombuffer(self.shm.buf, dtype=torch.int64, count=words)
        self.owner = create

    def written(self, slot: int) -> int:
        return int(self.control[slot])

    def set_written(self, slot: int, sequence: int) -> None:
        self.control[slot] = sequence

    def done(self, reader: int, slot: int) -> int:
        return int(self.control[NUM_SLOTS + reader * NUM_SLOTS + slot])

    def set_done(self, reader: int, slot: int, sequence: int) -> None:
        self.control[NUM_SLOTS + reader * NUM_SLOTS + slot] = sequence

    def failed_update(self, reader: int) -> int:
        return int(self.control[NUM_SLOTS + self.plan.num_readers * NUM_SLOTS + reader])

    def set_failed(self, reader: int, update_id: int) -> None:
        self.control[NUM_SLOTS + self.plan.num_readers * NUM_SLOTS + reader] = update_id

    @property
    def aborted_update(self) -> int:
        return int(self.control[NUM_SLOTS + self.plan.num_readers * (NUM_SLOTS + 1)])

    def abort(self, update_id: int) -> None:
        self.control[NUM_SLOTS + self.plan.num_readers * (NUM_SLOTS + 1)] = update_id

    def view(self, slot: int, tensor: TensorSlot) -> torch.Tensor:
        dtype = getattr(torch, tensor.dtype)
        count = math.prod(tensor.shape)
        offset = self.plan.control_bytes + slot * self.plan.slot_bytes + tensor.offset
        return torch.frombuffer(self.shm.buf, dtype=dtype, count=count, offset=offset).view(tensor.shape)

    def close(self) -> None:
        del self.control
        self.shm.close()
        if self.owner:
            self.shm.unlink()
            _CREATED_HERE.discard(self.name)


class BucketWriter:
    """A node's weight-sync writer, inside the node's first trainer rank: owns the node's
    shared-memory block and serves the engines of its node."""

    def __init__(self, plan: BucketPlan, node_id: str, local_readers: tuple[int, ...]):
        self.plan = plan
        self.local_readers = local_readers
        self._block = _Block(plan, node_id, create=True)

    def write(self, update: WeightUpdate, full_tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
        """Copy the gathered tensors (in plan order) into the slots, bucket by bucket, each slot once
        every engine in `update.readers` has loaded what it held before (an engine marked failed
        is no longer waited for). The previous update must be over (every engine's load
        returned) before the next one starts."""
        loading = tuple(reader for reader in update.readers if reader in self.local_readers)
        try:
            with _copy_threads(len(loading)):
                self._write(update, loading, full_tensors)
        except BaseException:
            self._block.abort(update.update_id)
            raise

    def _write(
        self, update: WeightUpdate, loading: tuple[int, ...], full_tensors: Iterator[tuple[str, torch.Tensor]]
    ) -> None:
        for bucket in update.plan.buckets:
            slot = bucket.index % NUM_SLOTS
            if bucket.index >= NUM_SLOTS:
                self._wait_for_readers(update, loading, slot, update.sequence(bucket.index - NUM_SLOTS), bucket.index)
            for tensor in bucket.tensors:
                name, value = next(full_tensors)
                if name != tensor.name:
                    raise WeightSyncError(f"the trainer sent {name!r} where the plan expects {tensor.name!r}")
                self._block.view(slot, tensor).copy_(value.detach().reshape(tensor.shape))
            self._block.set_written(slot, update.sequence(bucket.index))

    def _wait_for_readers(
        self, update: WeightUpdate, loading: tuple[int, ...], slot: int, sequence: int, bucket: int
    ) -> None:
        deadline = time.monotonic() + update.timeout_s
        for reader in loading:
            while self._block.done(reader, slot) < sequence:
                if self._block.failed_update(reader) == update.update_id:
                    break  # the controller restarts that engine; the others get their update
                if time.monotonic() > deadline:
                    raise WeightSyncError(
                        f"weight update to version {update.version}: rollout engine {reader} did not load bucket "
                        f"{bucket - NUM_SLOTS} within weight_sync.timeout_s={update.timeout_s:g}s"
                    )
                time.sleep(_POLL_S)

    def mark_reader_failed(self, reader: int, update_id: int) -> None:
        """For an engine of this node that died during an update: stop waiting for it at once and
        go on with the other engines."""
        self._block.set_failed(reader, update_id)

    def close(self) -> None:
        self._block.close()


class BucketReader:
    """An engine's side: follows its node's writer bucket by bucket and hands each to `load`."""

    def __init__(self, plan: BucketPlan, node_id: str, reader: int):
        self.plan, self.reader = plan, reader
        self._block = _Block(plan, node_id, create=False)

    async def read(self, update: WeightUpdate, load: Callable[[int], Awaitable[None]]) -> None:
        """`await load(bucket_index)` must copy the bucket out of its slot before returning."""
        try:
            await self._follow(update, load)
        except BaseException:
            self._block.set_failed(self.reader, update.update_id)
            raise

    async def _follow(self, update: WeightUpdate, load: Callable[[int], Awaitable[None]]) -> None:
        for bucket in update.plan.buckets:
            slot = bucket.index % NUM_SLOTS
            sequence = update.sequence(bucket.index)
            deadline = time.monotonic() + update.timeout_s
            while self._block.written(slot) != sequence:
                if self._block.aborted_update == update.update_id:
                    raise WeightSyncError(f"weight update to version {update.version} was aborted by the trainer")
                if time.monotonic() > deadline:
                    raise WeightSyncError(
                        f"weight update to version {update.version}: bucket {bucket.index} was not written within "
                        f"weight_sync.timeout_s={update.timeout_s:g}s (is the node's first trainer rank alive?)"
                    )
                await asyncio.sleep(_POLL_S)
            await load(bucket.index)
            self._block.set_done(self.reader, slot, sequence)

    def close(self) -> None:
        self._block.close()


def layout_of(state: dict[str, torch.Tensor]) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, dtype, full shape) of each tensor: what `plan_buckets` takes."""
    return [(name, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for name, t in state.items()]


class BucketViews:
    """Zero-copy views of a bucket's tensors in its slot, for the engine's weight loader. Views are
    valid until the bucket is marked done."""

    def __init__(self, plan: BucketPlan, node_id: str):
        self.plan = plan
        self._block = _Block(plan, node_id, create=False)

    def bucket(self, index: int) -> list[tuple[str, torch.Tensor]]:
        bucket = self.plan.buckets[index]
        return [(t.name, self._block.view(index % NUM_SLOTS, t)) for t in bucket.tensors]

    def close(self) -> None:
        self._block.close()


@contextmanager
def _copy_threads(loading_readers: int):
    """The writer copies with the cores the loading engines leave free (at least one): each engine
    copies out of the other slot at the same time, and torch's threads competing with them for a
    core slow both sides down more than the extra threads speed the write up."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, len(os.sched_getaffinity(0)) - loading_readers)))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
