"""The trainer's part of a run checkpoint: sharded parameters and optimizer state, written and read
by every rank at once with torch.distributed.checkpoint (DCP).

DCP stores each rank's shards with their global layout, so a checkpoint written by one trainer mesh
loads into another (a different data- or tensor-parallel size) and comes back exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from rl.trainer.optim import MuonWithAdamW


class TrainState(Stateful):
    """The model and both optimizers as one DCP item, keyed by parameter names."""

    def __init__(self, model: nn.Module, optimizer: MuonWithAdamW):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        model_state, optimizer_state = get_state_dict(self.model, self.optimizer.optimizers)
        return {"model": model_state, "optimizer": optimizer_state}

    def load_state_dict(self, state: dict) -> None:
        set_state_dict(
            self.model,
            self.optimizer.optimizers,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )


def save_train_state(directory: Path, model: nn.Module, optimizer: MuonWithAdamW, rank: int) -> None:
    """A collective: every rank writes its shards (and its RNG state) under `directory`."""
    dcp.save({"train": TrainState(model, optimizer)}, checkpoint_id=str(directory / "dcp"))
    (directory / "rng").mkdir(exist_ok=True)
    torch.save(torch.get_rng_state(), directory / "rng" / f"rank-{rank}.pt")


def load_train_state(directory: Path, model: nn.Module, optimizer: MuonWithAdamW, rank: int) -> None:
    """A collective: every rank reads its shards, resharded to this run's mesh where it differs."""
    dcp.load({"train": TrainState(model, optimizer)}, checkpoint_id=str(directory / "dcp"))
    rng = directory / "rng" / f"rank-{rank}.pt"
    if rng.is_file():  # a rank that did not exist when the checkpoint was written keeps its seed
        torch.set_rng_state(torch.load(rng))
