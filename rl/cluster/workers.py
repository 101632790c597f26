"""All the Ray actors of one run, started in order and stopped together."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray

from rl.cluster.engine_pool import EnginePool
from rl.cluster.placement import Placement, resolve_dtype, resolve_layout
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
    config: RunConfig

    @classmethod
    def start(cls, config: RunConfig, model_path: str) -> Workers:
        """Every actor of the run, wired; the engines hold no weights until the first `weight_sync.push`.
        Whatever started is stopped again if a later piece fails."""
        from transformers import AutoConfig

        config = resolve_layout(resolve_dtype(config), model_path)
        world = config.trainer.data_parallel_size * config.trainer.tensor_parallel_size
        # A mesh that cannot split the model fails here, before any process starts.
        check_layout(config.trainer, world, AutoConfig.from_pretrained(model_path))
        started: list = []
        try:
            placement = Placement(config)
            started.append(placement)
            # The engines start while the trainer ranks read the model and form their group.
            engines = EnginePool(config, model_path, placement)
            started.append(engines)
            trainers = TrainerGroup(config, model_path, placement)
            started.append(trainers)
            engines.wait_ready()
            weight_sync = WeightSync(config.weight_sync, trainers, engines, placement.engines_sleep)
        except BaseException:
            for piece in reversed(started):
                _stop(piece)
            raise
        workers = cls(placement, engines, trainers, weight_sync, config)
        log.info("placement: %s", workers.describe())
        return workers

    def serve(self, config: RunConfig) -> None:
        """Check that these workers can run `config` (a run given workers that another started): the
        same trainer mesh, engines and weight sync; the rest of a config is the loop's own."""
        for section, keys in _WORKER_KEYS.items():
            for key in keys:
                mine, theirs = getattr(getattr(self.config, section), key), getattr(getattr(config, section), key)
                if mine != theirs:
                    raise ValueError(f"these workers were started with {section}.{key}={mine!r}, the run asks for {theirs!r}")

    def describe(self) -> str:
        """Which node each trainer rank and engine runs on, by node address."""
        addresses = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
        ranks = ", ".join(addresses.get(node, node[:8]) for node in self.trainers.node_ids())
        engines = ", ".join(addresses.get(node, node[:8]) for node in self.engines.node_ids())
        return f"trainer ranks on [{ranks}] ({self.trainers.strategy}), engines on [{engines}]"

    def shutdown(self) -> None:
        """Stop every piece, whatever stopping the one before raised (a second Ctrl-C included);
        then raise the first such error."""
        first: BaseException | None = None
        for piece in (self.trainers, self.engines, self.weight_sync, self.placement):
            try:
                _stop(piece)
            except BaseException as error:  # noqa: BLE001 - re-raised once every piece is stopped
                first = first or error
        if first is not None:
            raise first


# What the actors themselves are made of: a run may use workers started for another config only
# when these agree.
_WORKER_KEYS = {
    "model": ("path", "dtype"),
    "trainer": ("data_parallel_size", "tensor_parallel_size", "data_parallel_strategy", "loss", "tau", "clip_low",
                "clip_high", "kl_coef", "tis_cap", "optimizer", "weight_decay", "adam_betas", "micro_batch_size", "optimizer_steps_per_batch",
                "reset_optimizer_each_step", "max_grad_norm", "logprob_chunk_size", "shared_prompt_row_tokens", "qk_clip_threshold"),
    "rollout": ("num_engines", "tensor_parallel_size", "kv_cache_gib", "max_model_len", "enforce_eager", "placement"),
}


def _stop(piece) -> None:
    if isinstance(piece, Placement):
        piece.release()
    else:
        piece.shutdown()
