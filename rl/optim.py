"""The optimizer split used by Moonlight and K2: Muon for hidden matrices, AdamW for everything else."""

from __future__ import annotations

import torch
from torch import nn

from rl.config import TrainerConfig

# Embeddings and the output head are matrices too, but Muon is meant for the
# hidden linear maps; these stay with AdamW.
_ADAMW_MATRICES = ("embed_tokens", "lm_head")


class MuonWithAdamW:
    """One optimizer-like object over two torch optimizers, so the trainer steps one thing."""

    def __init__(self, model: nn.Module, config: TrainerConfig):
        muon_params, adamw_params = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if param.ndim == 2 and not any(part in name for part in _ADAMW_MATRICES):
                muon_params.append(param)
            else:
                adamw_params.append(param)
        self.optimizers: list[torch.optim.Optimizer] = [
            torch.optim.AdamW(adamw_params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
        ]
        if muon_params:
            # Scaled to AdamW's update RMS (0.2 * sqrt(max(n, m))), with decoupled weight decay.
            self.optimizers.append(
                torch.optim.Muon(
                    muon_params, lr=config.lr, weight_decay=config.weight_decay, adjust_lr_fn="match_rms_adamw"
                )
            )

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
