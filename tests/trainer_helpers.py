"""What the trainer tests share: small batches, workers started in-process, full-tensor snapshots,
and 2-rank gloo runs."""

from __future__ import annotations

import gc
import random
from typing import Callable

import torch
import torch.multiprocessing as mp
from processes import free_port
from torch import nn

from rl.config import TrainerConfig
from rl.records import TrainSample
from rl.trainer.parallel import whole
from rl.trainer.worker import TrainerWorker

ADVANTAGES = [0.5, -0.5, 1.0, -1.0, 0.25, -0.25, 0.0, 0.0]


def samples(count: int, vocab: int, advantages: list[float] = ADVANTAGES, per_prompt: int = 2) -> list[TrainSample]:
    """Random prompts and responses of different lengths, so batches are padded; `per_prompt`
    consecutive samples share a prompt, as a group's do (the trainer computes it once for them)."""
    rng = random.Random(0)
    out = []
    for index in range(count):
        if index % per_prompt == 0:
            prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(4, 9))]
        response = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 7))]
        n = len(response)
        out.append(TrainSample(prompt + response, len(prompt), [1] * n, [-1.0] * n, [1.0] * n, [0] * n, advantages[index % len(advantages)]))
    return out


def start_worker(rank: int, world_size: int, port: int, policy, config: TrainerConfig, dtype: str = "float32",
                 strategy: str = "fsdp") -> TrainerWorker:
    """A trainer rank in this process, in a process group on loopback."""
    worker = TrainerWorker(rank, world_size, str(policy), dtype, config, seed=0)
    worker.join("127.0.0.1", port, "lo", strategy)
    return worker


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    # A gathered tensor may share the parameter's storage: clone to keep this moment's values.
    return whole(tensor).detach().clone()


def full_parameters_and_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    """Whole parameters and, as `<name>.grad`, gradients; a collective when the model is sharded."""
    state = {}
    for name, param in model.named_parameters():
        state[name] = _whole(param)
        if param.grad is not None:
            state[f"{name}.grad"] = _whole(param.grad)
    return state


def run_two_ranks(fn: Callable, *args) -> None:
    """fn(rank, world_size, port, *args) in two processes forked from this one; a failure on either rank
    fails the caller. Forked, not spawned: a spawned rank would spend seconds importing torch again."""
    mp.start_processes(_one_thread_rank, args=(fn, 2, free_port(), *args), nprocs=2, join=True, start_method="fork")


def _one_thread_rank(rank: int, fn: Callable, *args) -> None:
    # The child never collects what it inherited: a process group of an earlier test, left to the
    # parent's garbage collector, would join its threads, which do not exist after a fork, and hang.
    gc.freeze()
    # One thread per rank (two ranks, two cores). It also keeps the child out of the OpenMP thread
    # pool it inherited from the parent, whose threads do not exist after a fork: using them hangs.
    torch.set_num_threads(1)
    fn(rank, *args)
