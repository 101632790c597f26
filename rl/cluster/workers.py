"""All the Ray actors of one run, started in order and stopped together."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray

from rl.cluster.engine_pool import EnginePool
from rl.cluster.placement import Placement
from rl.cluster.trainer_group import TrainerGroup
from rl.config import RunConfig
from rl.trainer.parallel import check_layout
from rl.weight_sync.sync import WeightSync

log = logging.getLogger(__name__)

@dataclass
class Workers:
    placement: Placement
    engines: EnginePool
    trainers: TrainerGroup
    weight_sync: WeightSync

    @classmethod
    def start(cls, config: RunConfig, model_path: str) -> Workers:
        """Every actor of the run, wired; the engines hold no weights until the first `weight_sync.push`.
        Whatever started is stopped again if a later piece fails."""
        from transformers import AutoConfig

        world = config.trainer.data_parallel_size * config.trainer.tensor_parallel_size
        # A mesh that cannot split the model fails here, before any process starts.
        check_layout(config.trainer, world, AutoConfig.from_pretrained(model_path))
        started: list = []
        try:
            placement = Placement(config)
            started.append(placement)
            engines = EnginePool(config, model_path, placement)
            started.append(engines)
            trainers = TrainerGroup(config, model_path, placement)
            started.append(trainers)
            weight_sync = WeightSync(config.weight_sync, trainers, engines, placement.engines_sleep)
        except BaseException:
            for piece in reversed(started):
                _stop(piece)
            raise
        workers = cls(placement, engines, trainers, weight_sync)
        log.info("placement: %s", workers.describe())
        return workers

    def describe(self) -> str:
        """Which node each trainer rank and engine runs on, by node address."""
        addresses = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
        ranks = ", ".join(addresses.get(node, node[:8]) for node in self.trainers.node_ids())
        engines = ", ".join(addresses.get(node, node[:8]) for node in self.engines.node_ids())
        return f"trainer ranks on [{ranks}], engines on [{engines}]"

    def shutdown(self) -> None:
        for piece in (self.trainers, self.engines, self.placement):
            _stop(piece)


def _stop(piece) -> None:
    if isinstance(piece, Placement):
        piece.release()
    else:
        piece.shutdown()
