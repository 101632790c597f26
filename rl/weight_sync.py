"""Moving weights from the trainer into rollout engines in place, through shared memory.

The trainer writes every parameter into one named shared-memory block and sends
the engines a small manifest (names, dtypes, shapes, offsets); each engine maps
the block and reloads its weights from it. No checkpoint file is written, the
engine never restarts, and each update carries a version number.
"""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from multiprocessing import resource_tracker, shared_memory
from typing import Iterable, Iterator

import torch

_ALIGN = 64


@dataclass(frozen=True)
class TensorSlot:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class WeightManifest:
    """What an engine needs to find version `version` of the weights in shared memory."""

    block_name: str
    version: int
    slots: tuple[TensorSlot, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "WeightManifest":
        slots = tuple(TensorSlot(**{**s, "shape": tuple(s["shape"])}) for s in data["slots"])
        return cls(block_name=data["block_name"], version=data["version"], slots=slots)


class SharedWeightBlock:
    """The writer's side: one shared-memory block sized for the whole parameter set, reused every update."""

    def __init__(self, named_tensors: Iterable[tuple[str, torch.Tensor]]):
        slots, offset = [], 0
        for name, tensor in named_tensors:
            nbytes = tensor.numel() * tensor.element_size()
            slots.append(TensorSlot(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), offset, nbytes))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        self._slots = tuple(slots)
        free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else offset
        if free < offset:
            raise RuntimeError(
                f"weight sync needs {offset / 2**30:.2f} GiB of shared memory, /dev/shm has {free / 2**30:.2f} GiB free "
                "(in Docker, raise --shm-size)"
            )
        self._block = shared_memory.SharedMemory(name=f"k2rl-w-{uuid.uuid4().hex[:12]}", create=True, size=max(offset, 1))

    def write(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> WeightManifest:
        tensors = dict(named_tensors)
        for slot in self._slots:
            _view(self._block, slot).copy_(tensors[slot.name].detach().reshape(slot.shape))
        return WeightManifest(self._block.name, version, self._slots)

    def close(self) -> None:
        self._block.close()
        self._block.unlink()


@contextmanager
def mapped_weights(manifest: WeightManifest) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The reader's side: zero-copy tensor views into the writer's block.

    The views are valid only inside the `with`: the list is emptied on exit, and a
    view kept past it would point at unmapped memory.
    """
    block = shared_memory.SharedMemory(name=manifest.block_name)
    # Python 3.11 registers even attached blocks for cleanup; only the writer may unlink.
    resource_tracker.unregister(block._name, "shared_memory")  # noqa: SLF001
    tensors = [(slot.name, _view(block, slot)) for slot in manifest.slots]
    try:
        yield tensors
    finally:
        tensors.clear()
        block.close()


def _view(block: shared_memory.SharedMemory, slot: TensorSlot) -> torch.Tensor:
    dtype = getattr(torch, slot.dtype)
    count = slot.nbytes // torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(block.buf, dtype=dtype, count=count, offset=slot.offset).view(slot.shape)
