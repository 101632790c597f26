"""The optimizer split used by Moonlight and K2: Muon for hidden matrices, AdamW for everything else."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from rl.config import TrainerConfig
from rl.trainer.parallel import whole

# Embeddings and the output head are matrices too, but Muon is meant for the
# hidden linear maps; these stay with AdamW.
_ADAMW_MATRICES = ("embed_tokens", "lm_head")

# The quintic Newton-Schulz iteration of Keller Jordan's Muon, as in torch.optim.Muon.
_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
_NS_STEPS = 5
_NS_EPS = 1e-7


def orthogonalize(matrix: Tensor) -> Tensor:
    """An approximately orthogonal matrix with the singular vectors of `matrix`: in bfloat16 on an
    accelerator, as torch.optim.Muon computes it, and in float32 on CPU, where bfloat16 matrix
    products run tens of times slower than float32 ones."""
    a, b, c = _NS_COEFFICIENTS
    # Iterate on the wide orientation: the Gram matrix is then the smaller one.
    tall = matrix.size(0) > matrix.size(1)
    x = matrix.to(torch.float32 if matrix.device.type == "cpu" else torch.bfloat16)
    if tall:
        x = x.T
    # Frobenius norm >= spectral norm: after this every singular value is at most 1.
    x = x / x.norm().clamp(min=_NS_EPS)
    for _ in range(_NS_STEPS):
        gram = x @ x.T
        polynomial = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, polynomial, x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Nesterov-momentum Muon whose matrices may be sharded DTensors (FSDP2, tensor parallel).

    Momentum is elementwise, so it stays on each rank's shard. Orthogonalisation needs the
    whole matrix: every rank gathers the update, runs the same Newton-Schulz on it, and
    applies only its own shard of the result, so sharding does not change the update.
    The step size is matched to AdamW's update RMS (lr * 0.2 * sqrt(max(rows, cols))),
    and weight decay is decoupled: the same update as
    torch.optim.Muon(adjust_lr_fn="match_rms_adamw").
    """

    def __init__(self, params: Iterable[Tensor], lr: float, weight_decay: float, momentum: float = 0.95):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum})
        for group in self.param_groups:
            for param in group["params"]:
                if param.ndim != 2:
                    raise ValueError(f"Muon updates matrices only, got a parameter of shape {tuple(param.shape)}")

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - momentum)
                nesterov = param.grad.lerp(buffer, momentum)
                update = _shard_like(param, orthogonalize(whole(nesterov)))
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update, alpha=-lr * 0.2 * math.sqrt(max(param.shape)))


def _shard_like(param: Tensor, whole: Tensor) -> Tensor:
    """This rank's part of `whole`, laid out as `param`; every rank holds the same `whole`, so no communication."""
    if isinstance(param, DTensor):
        return distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)
    return whole


class MuonWithAdamW:
    """One optimizer-like object over two optimizers, so the trainer steps one thing. With
    `trainer.optimizer: adamw` every parameter goes to AdamW (the baseline of the split)."""

    def __init__(self, model: nn.Module, config: TrainerConfig):
        muon_params, adamw_params = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if config.optimizer == "muon" and param.ndim == 2 and not any(part in name for part in _ADAMW_MATRICES):
                muon_params.append(param)
            else:
                adamw_params.append(param)
        self.optimizers: list[torch.optim.Optimizer] = [
            torch.optim.AdamW(adamw_params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
        ]
        if muon_params:
            self.optimizers.append(Muon(muon_params, lr=config.lr, weight_decay=config.weight_decay))

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
