"""Where each actor of a run goes: one Ray placement group for the run.

On GPU every actor takes devices of its own (disaggregated: one bundle per trainer rank, one per
engine with its tensor-parallel GPUs), or engine i and trainer rank i share device i, half each
(colocated: one bundle per device). On CPU there are no devices to divide: each trainer rank gets
a bundle, engine i joins bundle i mod (trainer ranks), and the bundles are spread over the nodes,
so that every engine has a trainer rank on its node to serve it weights.
"""

from __future__ import annotations

import dataclasses

import ray
import torch
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rl.config import ConfigError, RunConfig, check_batch_split

# A CPU bundle reserves next to nothing: the actors share the cores.
_CPU_BUNDLE = {"CPU": 0.001}


def resolve_dtype(config: RunConfig) -> RunConfig:
    """`config` with `model.dtype: auto` made concrete: bfloat16 where the cluster's devices multiply
    in it natively (GPUs, and CPUs with AMX, whose tiles vLLM's CPU kernels and torch's matrix
    products use), float32 on other CPUs, where bfloat16 is emulated and slower. On a CPU cluster
    the driver's CPU speaks for the nodes. Resolved once, before any actor starts, so that engines
    and trainer agree and the run's saved config names the dtype it trained in."""
    if config.model.dtype != "auto":
        return config
    native = bool(_cluster_gpus()) or torch.cpu._is_amx_tile_supported()
    return dataclasses.replace(config, model=dataclasses.replace(config.model, dtype="bfloat16" if native else "float32"))


def _cluster_gpus() -> int:
    """The GPUs of the Ray cluster, or of this machine outside Ray: what an `auto` setting is resolved for."""
    return int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else torch.cuda.device_count()


# On CPU, a model at least this large gets one engine of all cores (`rollout.num_engines: auto`)
# and one trainer rank of all cores (`trainer.data_parallel_size: auto`); a smaller one two of each,
# of one thread (rl/config.py says why).
LARGE_MODEL_PARAMETERS = 20_000_000


def model_parameters(model_config) -> int:
    """The parameters of a model of this Hugging Face config, counted on the meta device (nothing is allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(model_config).parameters())


def resolve_layout(config: RunConfig, model_path: str) -> RunConfig:
    """`config` with `trainer.data_parallel_size`, `rollout.num_engines` and `rollout.enforce_eager`
    made concrete where they are auto, for this model and cluster (see `trainer_ranks` and
    `engine_layout`). Resolved once, before any actor starts, as the dtype."""
    trainer, rollout = config.trainer, config.rollout
    if "auto" not in (trainer.data_parallel_size, rollout.num_engines, rollout.enforce_eager):
        return config
    from transformers import AutoConfig

    gpus = _cluster_gpus()
    parameters = model_parameters(AutoConfig.from_pretrained(model_path))
    ranks = trainer_ranks(gpus, parameters) if trainer.data_parallel_size == "auto" else trainer.data_parallel_size
    engines, eager = engine_layout(gpus, ranks * trainer.tensor_parallel_size, rollout.tensor_parallel_size,
                                   rollout.placement == "colocated", parameters)
    resolved = dataclasses.replace(
        config,
        trainer=dataclasses.replace(trainer, data_parallel_size=ranks),
        rollout=dataclasses.replace(
            rollout,
            num_engines=engines if rollout.num_engines == "auto" else rollout.num_engines,
            enforce_eager=eager if rollout.enforce_eager == "auto" else rollout.enforce_eager,
        ),
    )
    check_batch_split(resolved)
    return resolved


def trainer_ranks(gpus: int, parameters: int) -> int:
    """Data-parallel trainer ranks: on CPU one of all cores for a model of LARGE_MODEL_PARAMETERS or
    more, else two of one thread each; on GPU two."""
    if gpus:
        return 2
    return 1 if parameters >= LARGE_MODEL_PARAMETERS else 2


def engine_layout(gpus: int, world: int, engine_tp: int, colocated: bool, parameters: int) -> tuple[int, bool]:
    """How many engines, and whether they run eager: on GPU one engine per GPU the trainer's `world`
    ranks leave (colocated: one per rank), eager; on CPU compiled, one engine for a model of
    LARGE_MODEL_PARAMETERS or more, else two."""
    if gpus:
        return (world if colocated else max(1, (gpus - world) // engine_tp)), True
    return (1 if parameters >= LARGE_MODEL_PARAMETERS else 2), False


class Placement:
    def __init__(self, config: RunConfig, timeout_s: float = 120.0):
        self.world = config.trainer.data_parallel_size * config.trainer.tensor_parallel_size
        self.num_engines = config.rollout.num_engines
        self.gpus = int(ray.cluster_resources().get("GPU", 0))
        self.colocated = config.rollout.placement == "colocated"
        self.engine_tp = config.rollout.tensor_parallel_size
        self.engine_threads = config.rollout.cpu_threads
        self._check(config)
        if not self.gpus:
            bundles, strategy = [_CPU_BUNDLE] * self.world, "SPREAD"
        elif self.colocated:
            bundles, strategy = [{"GPU": 1}] * self.world, "PACK"
        else:
            bundles = [{"GPU": 1}] * self.world + [{"GPU": self.engine_tp}] * self.num_engines
            strategy = "PACK"
        self.group: PlacementGroup | None = ray.util.placement_group(bundles, strategy=strategy)
        if not self.group.wait(timeout_s):
            self.release()
            raise ConfigError(
                f"the Ray cluster cannot place {len(bundles)} bundles of {bundles[0]} ({strategy}) within "
                f"{timeout_s:g}s: not enough resources for this trainer mesh and rollout.num_engines"
            )

    @property
    def engines_sleep(self) -> bool:
        """Colocated on GPU, engines and trainer take turns on each device."""
        return self.colocated and self.gpus > 0

    def _check(self, config: RunConfig) -> None:
        tp = self.engine_tp
        if tp > 1 and not self.gpus:
            raise ConfigError(f"rollout.tensor_parallel_size={tp} needs GPUs; the Ray cluster has none")
        if self.colocated and self.gpus and (self.num_engines != self.world or tp != 1):
            raise ConfigError(
                f"rollout.placement=colocated on GPU pairs one engine with each trainer rank: it needs "
                f"rollout.num_engines = {self.world} trainer ranks and rollout.tensor_parallel_size = 1"
            )
        needed = self.world if self.colocated else self.num_engines * tp + self.world
        if self.gpus and self.gpus < needed:
            raise ConfigError(
                f"{needed} GPUs needed for rollout.num_engines={self.num_engines} x "
                f"rollout.tensor_parallel_size={tp} and {self.world} trainer ranks "
                f"(rollout.placement={config.rollout.placement}), the Ray cluster has {self.gpus}"
            )

    def trainer_options(self, rank: int) -> dict:
        gpus = (0.5 if self.colocated else 1) if self.gpus else 0
        return {"num_cpus": 0, "num_gpus": gpus, "scheduling_strategy": self._bundle(rank)}

    def engine_options(self, index: int) -> dict:
        gpus = (0.5 if self.colocated else self.engine_tp) if self.gpus else 0
        return {"num_cpus": 0, "num_gpus": gpus, "scheduling_strategy": self._bundle(self._engine_bundle(index))}

    def _engine_bundle(self, index: int) -> int:
        """On CPU an engine shares a trainer rank's bundle (they take turns on its cores); colocated
        on GPU, its rank's device; disaggregated on GPU, a bundle of its own after the ranks'."""
        if not self.gpus:
            return index % self.world
        return index if self.colocated else self.world + index

    def engine_nodes(self) -> list[str]:
        """The node id of each engine, as placed: known before any engine starts."""
        bundle_nodes = ray.util.placement_group_table(self.group)["bundles_to_node_id"]
        return [bundle_nodes[self._engine_bundle(index)] for index in range(self.num_engines)]

    def engine_cpu_threads(self, index: int) -> int:
        """On CPU, the torch threads of engine `index`: `rollout.cpu_threads`, or else its node's cores
        shared among the engines placed there. 0 on GPU (vLLM's own choice)."""
        if self.gpus:
            return 0
        if self.engine_threads:
            return self.engine_threads
        node_cores = {node["NodeID"]: int(node["Resources"].get("CPU", 1)) for node in ray.nodes() if node["Alive"]}
        return shared_cores(self.engine_nodes(), node_cores, index)

    def _bundle(self, index: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=index)

    def release(self) -> None:
        if self.group is not None:
            ray.util.remove_placement_group(self.group)
            self.group = None


def shared_cores(engine_nodes: list[str], node_cores: dict[str, int], index: int) -> int:
    """The cores of engine `index`'s node divided among the engines on that node (at least one)."""
    node = engine_nodes[index]
    return max(1, node_cores[node] // engine_nodes.count(node))
