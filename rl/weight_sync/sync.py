"""Weight sync as one component of a run: each new version of the policy goes from the trainer
group into every rollout engine, in place, through the shared-memory transport (transport.py).

One writer per node serves the engines of its node: the node's first trainer rank, or on a node
without one a relay that the first trainer rank sends the buckets to (relay.py). An engine that
dies during an update is marked failed on its own node, by that node's writer, so the update goes
on for the others; the engine is then restarted and given the same version alone.
"""

from __future__ import annotations

import itertools
import uuid
from typing import TYPE_CHECKING

import ray

from rl.config import WeightSyncConfig
from rl.weight_sync.relay import start_relay
from rl.weight_sync.transport import WeightUpdate, plan_buckets
from rollout.engine import engine_died

if TYPE_CHECKING:
    from rl.cluster.engine_pool import EnginePool
    from rl.cluster.trainer_group import TrainerGroup


def writer_layout(trainer_nodes: list[str], engine_nodes: list[str]) -> tuple[dict[int, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Who writes for which engines: trainer rank -> the engines of its node (the first rank of each
    node), and node -> its engines for each node where no trainer rank runs (a relay's)."""
    first_rank: dict[str, int] = {}
    for rank, node in enumerate(trainer_nodes):
        first_rank.setdefault(node, rank)
    ranks: dict[int, tuple[int, ...]] = {}
    relays: dict[str, tuple[int, ...]] = {}
    for index, node in enumerate(engine_nodes):
        if node in first_rank:
            ranks[first_rank[node]] = ranks.get(first_rank[node], ()) + (index,)
        else:
            relays[node] = relays.get(node, ()) + (index,)
    return ranks, relays


class WeightSync:
    def __init__(self, config: WeightSyncConfig, trainers: TrainerGroup, engines: EnginePool, colocated: bool):
        self.config, self.trainers, self.engines, self.colocated = config, trainers, engines, colocated
        self.version = 0
        self._update_ids = itertools.count(1)
        self.plan = plan_buckets(
            trainers.weight_layout(),
            engines.packed_modules(),
            int(config.bucket_mb * 2**20),
            num_readers=len(engines),
            block_name=f"k2rl-weights-{uuid.uuid4().hex[:12]}",
        )
        self._engine_nodes = engines.node_ids()
        self._writers, relay_nodes = writer_layout(trainers.node_ids(), self._engine_nodes)
        ray.get([trainers.ranks[rank].open_weight_writer.remote(self.plan, local) for rank, local in self._writers.items()])
        self.relays = {node: start_relay(self.plan, node, local) for node, local in relay_nodes.items()}
        try:
            ray.get([relay.__ray_ready__.remote() for relay in self.relays.values()])
        except BaseException:
            self.shutdown()
            raise
        engines.load_weights = lambda index: self.push(self.version, (index,))

    def push(self, version: int, readers: tuple[int, ...] | None = None) -> int:
        """Version `version` into `readers` (every engine by default); returns it."""
        readers = tuple(range(len(self.engines))) if readers is None else readers
        update = WeightUpdate(self.plan, next(self._update_ids), version, readers, self.config.timeout_s)
        engines = self.engines.engines
        if self.colocated:
            # The device holds the trainer's parameters and the engines' weights during the update.
            self.trainers.offload(parameters=False)
            ray.get([engines[index].wake_up.remote(("weights",)) for index in readers])
        reader_nodes = {self._engine_nodes[index] for index in readers}
        relays = [relay for node, relay in self.relays.items() if node in reader_nodes]
        gathers = [rank.broadcast_weights.remote(update, relays if index == 0 else []) for index, rank in enumerate(self.trainers.ranks)]
        relayed = [relay.write.remote(update) for relay in relays]
        loads = {engines[index].receive_update.remote(update, index): index for index in readers}
        died: dict[int, BaseException] = {}
        pending = list(loads)
        while pending:  # in completion order: a dead engine is noticed while the others still wait
            (future,), pending = ray.wait(pending, num_returns=1)
            try:
                ray.get(future)
            except ray.exceptions.RayError as error:
                if not engine_died(error):
                    raise
                index = loads[future]
                died[index] = error
                ray.get(self._writer_of(index).mark_reader_failed.remote(index, update.update_id))
        ray.get(gathers + relayed)
        if self.colocated:
            # The trainer's memory goes to the host before the engines' KV caches come back.
            self.trainers.offload()
            ray.get([engines[index].wake_up.remote(("kv_cache",)) for index in readers if index not in died])
        self.version = version
        for index, error in died.items():
            self.engines.restart(index, error)
        return version

    def _writer_of(self, engine: int):
        """The actor that writes for `engine`: its node's first trainer rank, or its node's relay."""
        rank = next((rank for rank, readers in self._writers.items() if engine in readers), None)
        return self.trainers.ranks[rank] if rank is not None else self.relays[self._engine_nodes[engine]]

    def shutdown(self) -> None:
        """Stop the relays, their shared-memory blocks unlinked first (the trainer ranks close their own)."""
        try:
            ray.get([relay.close.remote() for relay in self.relays.values()], timeout=30)
        except Exception:  # noqa: BLE001 - cleanup must reach the kills below
            pass
        finally:  # a Ctrl-C during the wait too
            for relay in self.relays.values():
                ray.kill(relay)
            self.relays = {}
