"""QK-Clip (the "Clip" of MuonClip, Kimi K2): keep attention logits bounded after every update.

During the forward a registered attention function (eager math) records each head's
largest pre-softmax logit S_h over the query-key pairs the masks allow. After the
optimizer step every head with S_h above the threshold t has its query and key
projections rescaled so that all its logits shrink by exactly gamma_h = t / S_h.
Qwen2's q and k projections have biases and the logits are bilinear in (W_q x + b_q)
and (W_k x + b_k), so a head's bias rows are scaled with its weight rows; the rotary
embedding rotates each head as a whole and commutes with the scaling.

With grouped-query attention a key head is shared: it is scaled by sqrt of the smallest
gamma in its group and each query head by its own gamma divided by that, which gives
every head exactly its gamma (with one key head per query head: sqrt(gamma) on each side).

Qwen3 normalises every head's query and key (q_norm, k_norm: RMSNorm over head_dim, one
weight shared by all heads of a layer) after the projections. A per-head scale of W_q or
W_k is undone by that norm, so the logits can only be scaled through the norm weights,
which act on all heads of the layer at once: such a layer is clipped as a whole, by the
smallest gamma of its heads, with q_norm and k_norm each scaled by sqrt(gamma_min). The
head with the largest logit lands exactly on the threshold, the others shrink by the same
factor (more than they need to). The rotary embedding comes after the norms and commutes
with a scalar scale.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

ATTENTION_IMPLEMENTATION = "k2rl_qk_clip"
# Set on each attention module by the forward: the running per-head maximum of its local heads.
MAX_LOGITS_ATTRIBUTE = "max_attention_logits"


def _recording_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    logits = query @ key.transpose(2, 3) * scaling
    _record_max_logits(module, logits.detach(), attention_mask)
    if attention_mask is not None:
        logits = logits + attention_mask
    weights = nn.functional.softmax(logits, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return (weights @ value).transpose(1, 2).contiguous(), weights


def _record_max_logits(module: nn.Module, logits: Tensor, attention_mask: Tensor | None) -> None:
    """Fold this forward's per-head maxima into the module's running maximum.

    The eager mask is 0 where a query may attend to a key and very negative elsewhere. A
    padding position cannot attend to itself, which tells the real queries apart: logits
    of padding queries never reach the loss and must not trigger a clip.
    """
    if attention_mask is None:
        allowed = torch.ones_like(logits, dtype=torch.bool)
    else:
        key_allowed = attention_mask == 0
        q_length, kv_length = key_allowed.shape[-2:]
        query_is_real = key_allowed[..., kv_length - q_length :].diagonal(dim1=-2, dim2=-1)
        allowed = key_allowed & query_is_real.unsqueeze(-1)
    per_head = logits.masked_fill(~allowed, float("-inf")).amax(dim=(0, 2, 3))
    previous = getattr(module, MAX_LOGITS_ATTRIBUTE, None)
    setattr(module, MAX_LOGITS_ATTRIBUTE, per_head if previous is None else torch.maximum(previous, per_head))


AttentionInterface.register(ATTENTION_IMPLEMENTATION, _recording_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_IMPLEMENTATION, eager_mask)


class QKClip:
    """Records the attention logits of `model` and clips its heads after each update.

    `max_logits` and `clip` are collectives over every rank of `mesh`, which must span the
    default process group; `clip` works on plain parameters and on FSDP2 / tensor-parallel
    DTensors alike.
    """

    def __init__(self, model: nn.Module, threshold: float, mesh: DeviceMesh):
        config = model.config
        self.threshold = threshold
        self.attentions = [layer.self_attn for layer in model.model.layers]
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = self.attentions[0].head_dim
        self.per_head_norms = hasattr(self.attentions[0], "q_norm")
        # Tensor parallelism gives each rank a contiguous block of heads.
        heads_per_rank = self.num_heads // mesh["tp"].size()
        first = mesh["tp"].get_local_rank() * heads_per_rank
        self.local_heads = slice(first, first + heads_per_rank)
        model.set_attn_implementation(ATTENTION_IMPLEMENTATION)

    def reset(self) -> None:
        """Forget what earlier forwards recorded."""
        for attention in self.attentions:
            setattr(attention, MAX_LOGITS_ATTRIBUTE, None)

    def max_logits(self) -> Tensor:
        """[layers, heads]: each head's largest logit since `reset`, over every rank (-inf: not run)."""
        device = next(self.attentions[0].parameters()).device
        maxima = torch.full((len(self.attentions), self.num_heads), float("-inf"), device=device)
        for layer, attention in enumerate(self.attentions):
            recorded = getattr(attention, MAX_LOGITS_ATTRIBUTE, None)
            if recorded is not None:
                maxima[layer, self.local_heads] = recorded.float()
        # Each rank fills in its tensor-parallel heads from its own data shard: one MAX
        # over all ranks gathers the heads and agrees over the data at once.
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
        return maxima.cpu()

    @torch.no_grad()
    def clip(self) -> Tensor:
        """Rescale every head above the threshold; returns the maxima it acted on (see `max_logits`)."""
        maxima = self.max_logits()
        gammas = torch.where(maxima > self.threshold, self.threshold / maxima, 1.0)
        for attention, gamma in zip(self.attentions, gammas):
            if (gamma < 1).any():
                self._rescale(attention, gamma)
        return maxima

    def _rescale(self, attention: nn.Module, gamma: Tensor) -> None:
        if self.per_head_norms:
            root = gamma.min().sqrt().item()
            attention.q_norm.weight.mul_(root)
            attention.k_norm.weight.mul_(root)
            return
        groups = self.num_heads // self.num_kv_heads
        key_scale = gamma.view(self.num_kv_heads, groups).amin(dim=1).sqrt()
        query_scale = gamma / key_scale.repeat_interleave(groups)
        for projection, head_scale in ((attention.q_proj, query_scale), (attention.k_proj, key_scale)):
            row_scale = head_scale.repeat_interleave(self.head_dim)
            for param in (projection.weight, projection.bias):
                if param is None:
                    continue
                scale = row_scale if param.ndim == 1 else row_scale[:, None]
                param.mul_(_like(param, scale))


def _like(param: Tensor, scale: Tensor) -> Tensor:
    """`scale` on the device (and, for a DTensor, the mesh) of `param`; every rank holds the same values."""
    scale = scale.to(device=param.device, dtype=param.dtype)
    if isinstance(param, DTensor):
        return DTensor.from_local(scale, param.device_mesh, [Replicate()] * param.device_mesh.ndim, run_check=False)
    return scale
