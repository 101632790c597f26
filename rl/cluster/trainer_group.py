"""The trainer ranks of a run, driven as one: start and rendezvous, train on a batch, checkpoints."""

from __future__ import annotations

import dataclasses

import ray

from rl.cluster.placement import Placement
from rl.config import RunConfig
from rl.records import TrainSample
from rl.trainer.parallel import data_parallel_strategy
from rl.trainer.shared_prompts import prompt_groups
from rl.trainer.worker import TrainerWorker


def merge_rank_metrics(results: list[dict], tensor_parallel_size: int) -> dict[str, float]:
    """One batch's metrics from every rank's `TrainerWorker.train` result: (total, count) pairs add
    up over the data-parallel groups (the first rank of each), other values take their maximum."""
    merged: dict[str, float] = {}
    for name in results[0]:
        if isinstance(results[0][name], tuple):
            total = sum(result[name][0] for result in results[::tensor_parallel_size])
            count = sum(result[name][1] for result in results[::tensor_parallel_size])
            merged[name] = total / count if count else 0.0
        else:
            merged[name] = max(result[name] for result in results)
    # Every rank sees the same global gradient norm: not a quantity to add up.
    merged["grad_norm"] = results[0]["grad_norm"][0] / results[0]["grad_norm"][1]
    return merged


def _masked(sample: TrainSample) -> TrainSample:
    """A copy of `sample` that trains on nothing: padding that keeps every rank's shard equal."""
    return dataclasses.replace(sample, loss_mask=[0] * len(sample.loss_mask), advantage=0.0)


class TrainerGroup:
    """`trainer.data_parallel_size` x `trainer.tensor_parallel_size` TrainerWorker actors in one
    process group, formed at rank 0's node address (so the ranks may sit on any nodes).

    The checkpoint is read from disk once, by rank 0; the other ranks get their shards from it.
    """

    def __init__(self, config: RunConfig, model_path: str, placement: Placement):
        self.config = config
        self.tp = config.trainer.tensor_parallel_size
        self.world = config.trainer.data_parallel_size * self.tp
        # A second concurrency group lets the driver reach a writer that waits inside an update.
        actor = ray.remote(concurrency_groups={"control": 1})(TrainerWorker)
        self.ranks = [
            actor.options(**placement.trainer_options(rank)).remote(
                rank, self.world, model_path, config.model.dtype, config.trainer, config.seed
            )
            for rank in range(self.world)
        ]
        try:
            parameters = ray.get(self.ranks[0].parameter_count.remote())
            device_bytes = min(ray.get([rank.device_memory_bytes.remote() for rank in self.ranks]))
            self.strategy = data_parallel_strategy(config.trainer.data_parallel_strategy, parameters, device_bytes)
            address, port = ray.get(self.ranks[0].rendezvous_address.remote())
            ray.get([rank.join.remote(address, port, config.cluster.network_interface, self.strategy) for rank in self.ranks])
        except BaseException:
            self.shutdown()
            raise

    def node_ids(self) -> list[str]:
        return ray.get([rank.node_id.remote() for rank in self.ranks])

    def weight_layout(self) -> list[tuple[str, str, tuple[int, ...]]]:
        return ray.get(self.ranks[0].weight_layout.remote())

    def train(self, samples: list[TrainSample], policy_version: int, lr: float, ptx: list[TrainSample] = (),
              ptx_coef: float = 0.0, skipped_units: float = 0.0) -> dict[str, float]:
        """Each data-parallel group gets an equal shard of the batch and of the PTX samples (the ranks
        of one tensor-parallel group share it); both are padded with masked-out copies to split
        evenly. `policy_version` is the version the engines sampled with, `lr` this step's learning
        rate; `skipped_units` are the denominator units of samples left out because their gradient
        is zero, shared by the groups."""
        shards, ptx_shards = self._shards(samples), self._shards(list(ptx))
        share = skipped_units / (self.world // self.tp)
        results = ray.get([rank.train.remote(shards[index // self.tp], policy_version, ptx_shards[index // self.tp], ptx_coef,
                                             skipped_units=share, lr=lr)
                           for index, rank in enumerate(self.ranks)])
        return merge_rank_metrics(results, self.tp)

    def _shards(self, samples: list[TrainSample]) -> list[list[TrainSample]]:
        return shard_batch(samples, self.world // self.tp, self.config.trainer.optimizer_steps_per_batch)

    def ptx_eval(self, samples: list[TrainSample]) -> float:
        """The mean next-token loss over the masked tokens of `samples`."""
        nll, tokens = ray.get([rank.ptx_eval.remote(samples) for rank in self.ranks])[0]
        return nll / max(tokens, 1.0)

    def logprobs(self, token_ids: list[int]) -> list[float]:
        """The trainer's logprobs of a fixed sequence (a collective: every rank takes part)."""
        return ray.get([rank.sequence_logprobs.remote(token_ids) for rank in self.ranks])[0]

    def offload(self, parameters: bool = True) -> None:
        ray.get([rank.offload.remote(parameters=parameters) for rank in self.ranks])

    def save_model(self, out_dir: str) -> None:
        ray.get([rank.save_model.remote(out_dir) for rank in self.ranks])

    def reset(self, seed: int) -> None:
        """Every rank back to the model's weights, a fresh optimizer and `seed` (a new run on ranks that an earlier one trained)."""
        ray.get([rank.reset.remote(seed) for rank in self.ranks])

    def save_state(self, directory: str) -> None:
        ray.get([rank.save_state.remote(directory) for rank in self.ranks])

    def load_state(self, directory: str) -> None:
        ray.get([rank.load_state.remote(directory) for rank in self.ranks])

    def shutdown(self) -> None:
        """Release shared memory and the process group, then stop the actors. A rank stuck in a
        collective (a peer died, Ctrl-C) cannot answer, so the polite request is bounded."""
        try:
            ray.get([rank.shutdown.remote() for rank in self.ranks], timeout=30)
        except Exception:  # noqa: BLE001 - cleanup must reach the kills below
            pass
        finally:  # a Ctrl-C during the wait too
            for rank in self.ranks:
                ray.kill(rank)
            self.ranks = []


def shard_batch(samples: list[TrainSample], data_parallel_size: int, steps: int) -> list[list[TrainSample]]:
    """Each data-parallel rank's part of the batch: `steps` equal mini-batches, one per optimizer step."""
    if not samples:
        return [[] for _ in range(data_parallel_size)]
    parts = data_parallel_size * steps
    # A prompt's samples side by side, so that a shard holds whole groups: the trainer computes a
    # prompt once for the samples of it that share a micro-batch.
    samples = [sample for group in prompt_groups(samples) for sample in group]
    # One part per rank and optimizer step, as equal as can be, each padded to the largest with
    # masked copies: no step of any rank trains on padding alone while another has samples to spare.
    size = -(-len(samples) // parts)
    full = len(samples) - (size - 1) * parts  # the first `full` parts need no padding
    padded, start = [], 0
    for part in range(parts):
        short = part >= full
        padded.append(samples[start : start + size - short] + [_masked(samples[0])] * short)
        start += size - short
    return [[sample for part in padded[rank * steps : (rank + 1) * steps] for sample in part] for rank in range(data_parallel_size)]
