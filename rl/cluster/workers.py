"""All the Ray actors of one run, started in order and stopped together."""

from __future__ import annotations

from dataclasses import dataclass

from rl.cluster.engine_pool import EnginePool
from rl.cluster.placement import Placement
from rl.cluster.trainer_group import TrainerGroup
from rl.config import RunConfig
from rl.trainer.parallel import check_layout
from rl.weight_sync.sync import WeightSync

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
        return cls(placement, engines, trainers, weight_sync)

    def shutdown(self) -> None:
        for piece in (self.trainers, self.engines, self.placement):
            _stop(piece)


def _stop(piece) -> None:
    if isinstance(piece, Placement):
        piece.release()
    else:
        piece.shutdown()
