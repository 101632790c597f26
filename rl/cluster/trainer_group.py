"""The trainer ranks of a run, driven as one: start and rendezvous, train on a batch, checkpoints."""

from __future__ import annotations

import ray

from rl.cluster.placement import Placement
from rl.config import RunConfig
from rl.records import TrainSample
from rl.trainer.worker import TrainerWorker


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
            address, port = ray.get(self.ranks[0].rendezvous_address.remote())
            ray.get([rank.join.remote(address, port, config.cluster.network_interface) for rank in self.ranks])
        except BaseException:
            self.shutdown()
            raise

    def node_ids(self) -> list[str]:
        return ray.get([rank.node_id.remote() for rank in self.ranks])

    def weight_layout(self) -> list[tuple[str, str, tuple[int, ...]]]:
        return ray.get(self.ranks[0].weight_layout.remote())

    def train(self, samples: list[TrainSample]) -> dict[str, float]:
        """Each data-parallel group gets an equal shard; the ranks of one tensor-parallel group share it."""
        dp = self.world // self.tp
        shard = len(samples) // dp
        results = ray.get(
            [rank.train.remote(samples[(index // self.tp) * shard : (index // self.tp + 1) * shard])
             for index, rank in enumerate(self.ranks)]
        )
        leaders = results[:: self.tp]  # one rank per data-parallel group
        tokens = sum(r["response_tokens"] for r in leaders)
        merged = {
            "loss": sum(r["loss"] for r in leaders) / dp,
            "grad_norm": results[0]["grad_norm"],
            "log_ratio_abs_mean": sum(r["log_ratio_abs_mean"] for r in leaders) / dp,
            "logprob_diff_mean": sum(r["logprob_diff_sum"] for r in leaders) / max(tokens, 1),
        }
        if "max_attention_logit" in results[0]:
            merged["max_attention_logit"] = results[0]["max_attention_logit"]
        return merged

    def logprobs(self, token_ids: list[int]) -> list[float]:
        """The trainer's logprobs of a fixed sequence (a collective: every rank takes part)."""
        return ray.get([rank.sequence_logprobs.remote(token_ids) for rank in self.ranks])[0]

    def offload(self, parameters: bool = True) -> None:
        ray.get([rank.offload.remote(parameters=parameters) for rank in self.ranks])

    def save_model(self, out_dir: str) -> None:
        ray.get([rank.save_model.remote(out_dir) for rank in self.ranks])

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
        for rank in self.ranks:
            ray.kill(rank)
        self.ranks = []
