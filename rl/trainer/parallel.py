"""Sharding the policy over the trainer ranks: Megatron tensor parallelism inside FSDP2.

The ranks form a 2-D device mesh ("dp", "tp"); rank r sits at (r // tp, r % tp), so
the tp ranks of one data-parallel replica are consecutive and must all train on the
same data shard. Tensor parallelism splits every attention and MLP block over "tp"
(column-parallel in, row-parallel out: one activation all-reduce per block forward and
one backward) and the vocabulary of the embedding and the output head: the logprobs come
from a vocabulary-parallel log-softmax (rl/trainer/logprobs.py), never from gathered logits.
FSDP2 then shards every parameter over "dp". With tp == 1 the tensor-parallel plan is
skipped: the same mesh, FSDP2 alone.

Tied input and output embeddings stay one parameter: the embedding and the head split the
same [vocabulary, hidden] matrix by rows, so one DTensor serves both, and FSDP2 and the
optimizer see it once.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from transformers import PretrainedConfig

from rl.config import ConfigError, TrainerConfig

# Llama/Qwen attention reshapes its projections with -1 heads, so each rank simply runs its
# local heads. The output head's rows (one per vocabulary entry) are split like the embedding's;
# its module is never called, the chunked logprob forward takes its weight (rl/trainer/logprobs.py).
_MEGATRON_PLAN = {
    "model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
    "model.layers.*.self_attn.q_proj": ColwiseParallel(),
    "model.layers.*.self_attn.k_proj": ColwiseParallel(),
    "model.layers.*.self_attn.v_proj": ColwiseParallel(),
    "model.layers.*.self_attn.o_proj": RowwiseParallel(),
    "model.layers.*.mlp.gate_proj": ColwiseParallel(),
    "model.layers.*.mlp.up_proj": ColwiseParallel(),
    "model.layers.*.mlp.down_proj": RowwiseParallel(),
    "lm_head": ColwiseParallel(),
}

# Qwen3 normalises each head's query and key with one weight shared by all heads. A rank's input to
# these norms holds its own heads only: marked as split over the heads dimension of
# [batch, seq, heads, head_dim], the weight's gradient (a sum over heads) is summed over the tp ranks.
_PER_HEAD_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
_HEADS_DIMENSION = 2

# Each of these is split into tensor_parallel_size equal parts. The vocabulary need not divide:
# the embedding and the head take uneven shards (DTensor gives the last ranks one row fewer).
_SPLIT_DIMENSIONS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def whole(tensor: Tensor) -> Tensor:
    """The full tensor: gathered from every rank for a DTensor (a collective), as it is otherwise."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def check_layout(config: TrainerConfig, world_size: int, model_config: PretrainedConfig) -> None:
    """Raise a ConfigError naming the key when the mesh cannot be built or cannot split the model."""
    dp, tp = config.data_parallel_size, config.tensor_parallel_size
    if dp * tp != world_size:
        raise ConfigError(
            f"trainer.data_parallel_size x trainer.tensor_parallel_size = {dp} x {tp} = {dp * tp} "
            f"does not match the {world_size} trainer ranks"
        )
    for name in _SPLIT_DIMENSIONS:
        value = getattr(model_config, name)
        if value % tp:
            raise ConfigError(f"trainer.tensor_parallel_size={tp} does not divide the model's {name}={value}")


def build_mesh(config: TrainerConfig, device_type: str) -> DeviceMesh:
    """The ("dp", "tp") mesh over the default process group, which must already exist."""
    shape = (config.data_parallel_size, config.tensor_parallel_size)
    return init_device_mesh(device_type, shape, mesh_dim_names=("dp", "tp"))


# A float32 parameter, its gradient, and up to two float32 optimizer moments (AdamW; Muon keeps one).
TRAINING_BYTES_PER_PARAMETER = 16


def data_parallel_strategy(configured: str, parameters: int, device_bytes: int) -> str:
    """"fsdp" or "replicate" for `trainer.data_parallel_strategy`: "auto" replicates a model whose
    training state takes under a quarter of a rank's device memory, where sharding only adds
    communication; an explicit "replicate" that cannot fit fails here, naming the key."""
    state = parameters * TRAINING_BYTES_PER_PARAMETER
    if configured == "auto":
        return "replicate" if state < device_bytes / 4 else "fsdp"
    if configured == "replicate" and state > device_bytes:
        raise ConfigError(
            f"trainer.data_parallel_strategy=replicate: the model's parameters, gradients and optimizer state "
            f"need {state / 2**30:.1f} GiB on every rank, more than a rank's {device_bytes / 2**30:.1f} GiB "
            "(use fsdp, which shards them)"
        )
    return configured


def shard_model(model: nn.Module, mesh: DeviceMesh, compute_dtype: torch.dtype = torch.float32,
                strategy: str = "fsdp") -> None:
    """In place: tensor-parallel over mesh["tp"] (when > 1), then data-parallel over mesh["dp"]:
    FSDP2 (`strategy` "fsdp": every layer's parameters sharded, gathered for its forward and
    backward) or replicated ("replicate": every rank holds all parameters, and the gradients are
    all-reduced once per step).

    The parameters stay as they are (float32 master weights); a lower `compute_dtype` is what the
    forward and backward run in, with gradients reduced in float32 (FSDP2 mixed precision).
    """
    tied = getattr(model.config, "tie_word_embeddings", False)
    tp_mesh = mesh["tp"]
    if tp_mesh.size() > 1:
        # Every rank loaded the same weights, so each takes its own shard without communication.
        parallelize_module(model, tp_mesh, _MEGATRON_PLAN, src_data_rank=None)
        if tied:
            # The plan distributes the embedding and the head one after the other, which unties them.
            # Both shard the same [vocab, hidden] matrix by rows, so one DTensor serves both.
            model.lm_head.weight = model.model.embed_tokens.weight
        _replicate_remaining_parameters(model, tp_mesh)
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    # The root's float inputs are the sampling temperatures, which divide the logits as they are:
    # cast to bfloat16, 0.8 would become 0.80078125 and the logprobs would leave the engines'.
    root_policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    if strategy == "replicate":
        replicate(model, mesh=mesh["dp"], mp_policy=root_policy)
        return
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh["dp"], mp_policy=policy)
    # By default the root module keeps its parameters gathered after a forward until the
    # backward; after a no-grad forward (pi_old, sequence_logprobs) the optimizer, QK-Clip
    # and the state dict would then not see the sharded parameters.
    fully_shard(model, mesh=mesh["dp"], reshard_after_forward=True, mp_policy=root_policy)


def _replicate_remaining_parameters(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Make the parameters outside the plan (the RMSNorm weights) replicated DTensors on the tp mesh.

    FSDP2 would otherwise put them on the 1-D dp mesh next to 2-D (dp, tp) tensor-parallel
    ones, and gradient clipping and the optimizers cannot combine DTensors of two meshes.
    The module still sees and returns plain activations.
    """
    for name, module in model.named_modules():
        if any(not isinstance(param, DTensor) for param in module.parameters(recurse=False)):
            per_head = name.endswith(_PER_HEAD_NORMS)
            input_placement = Shard(_HEADS_DIMENSION) if per_head else Replicate()
            distribute_module(module, tp_mesh, input_fn=_inputs_as_dtensors(input_placement), output_fn=_local_output)


def _inputs_as_dtensors(placement: Placement):
    def as_dtensors(module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        return tuple(DTensor.from_local(x, mesh, [placement], run_check=False) for x in inputs)

    return as_dtensors


def _local_output(module: nn.Module, output: DTensor, mesh: DeviceMesh) -> Tensor:
    return output.to_local()
