"""Trainer workers: Ray actors that form one torch.distributed group and update the policy.

Each rank holds a full replica wrapped in DistributedDataParallel (gloo on CPU,
NCCL on GPU) and trains on its shard of the batch:

    recompute pi_old logprobs  ->  for each mini-batch: micro-batches with gradient
    accumulation  ->  all-reduce  ->  clip  ->  Muon/AdamW step

Rank 0 then publishes the new weights into shared memory for the rollout engines.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM, AutoTokenizer

from rl.config import TrainerConfig
from rl.loss import k2_policy_loss, token_logprobs
from rl.optim import MuonWithAdamW
from rl.records import Trajectory
from rl.weight_sync import SharedWeightBlock


class TrainerWorker:
    """Run as a Ray actor; `rank` 0 also owns the shared-memory weight block."""

    def __init__(
        self,
        rank: int,
        world_size: int,
        master_port: int,
        model_path: str,
        dtype: str,
        config: TrainerConfig,
        seed: int,
    ):
        self.rank, self.world_size, self.config = rank, world_size, config
        use_cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        if not use_cuda:
            # Trainer ranks share the machine's cores with each other and with the engines.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port))
        # All ranks share this node: keep gloo's traffic on the loopback interface.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group(
            "nccl" if use_cuda else "gloo", rank=rank, world_size=world_size, timeout=timedelta(minutes=10)
        )
        torch.manual_seed(seed)
        self.model_path = model_path
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).to(self.device)
        model.config.use_cache = False
        self.model = model
        # The only buffers (rotary tables) are identical on every rank: no need to broadcast them.
        self.ddp = DistributedDataParallel(model, forward_sync_buffers=False)
        self.optimizer = MuonWithAdamW(model, config)
        self.weight_block = SharedWeightBlock(self._full_state()) if rank == 0 else None

    def _full_state(self) -> list[tuple[str, torch.Tensor]]:
        return list(self.model.state_dict().items())

    def _batch_tensors(self, trajectories: list[Trajectory]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ids, attention mask, and a mask over the logprob positions of response tokens."""
        rows = [t.prompt_ids + t.response_ids for t in trajectories]
        width = max(map(len, rows))
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        attention = torch.zeros(len(rows), width, dtype=torch.long)
        response_mask = torch.zeros(len(rows), width - 1)
        for i, (row, t) in enumerate(zip(rows, trajectories)):
            input_ids[i, : len(row)] = torch.tensor(row)
            attention[i, : len(row)] = 1
            start = len(t.prompt_ids) - 1
            response_mask[i, start : start + len(t.response_ids)] = torch.tensor(t.loss_mask, dtype=torch.float)
        return input_ids.to(self.device), attention.to(self.device), response_mask.to(self.device)

    def _token_logprobs(self, module, trajectories: list[Trajectory], temperature: float):
        input_ids, attention, response_mask = self._batch_tensors(trajectories)
        logits = module(input_ids=input_ids, attention_mask=attention).logits
        return token_logprobs(logits, input_ids, temperature), response_mask

    def train(self, trajectories: list[Trajectory], advantages: list[float], temperature: float) -> dict[str, float]:
        """One batch (this rank's shard): pi_old recompute, then `optimizer_steps_per_batch` updates."""
        config = self.config
        if config.reset_optimizer_each_step:
            self.optimizer = MuonWithAdamW(self.model, config)
        micro = config.micro_batch_size
        logprob_diff_sum, response_tokens = 0.0, 0.0
        old_sums = []
        with torch.no_grad():
            for start in range(0, len(trajectories), micro):
                chunk = trajectories[start : start + micro]
                logprobs, mask = self._token_logprobs(self.model, chunk, temperature)
                old_sums.append((logprobs * mask).sum(-1))
                rollout = torch.zeros_like(logprobs)
                for i, t in enumerate(chunk):
                    begin = len(t.prompt_ids) - 1
                    rollout[i, begin : begin + len(t.response_ids)] = torch.tensor(t.response_logprobs)
                logprob_diff_sum += ((logprobs - rollout).abs() * mask).sum().item()
                response_tokens += mask.sum().item()
        old_logprob_sums = torch.cat(old_sums)
        advantage = torch.tensor(advantages, device=self.device)

        steps = config.optimizer_steps_per_batch
        per_step = len(trajectories) // steps
        losses, grad_norms, log_ratios = [], [], []
        for step in range(steps):
            lo, hi = step * per_step, (step + 1) * per_step
            self.optimizer.zero_grad()
            micro_starts = list(range(lo, hi, micro))
            step_loss = 0.0
            for index, start in enumerate(micro_starts):
                end = min(start + micro, hi)
                sync = index == len(micro_starts) - 1
                with nullcontext() if sync else self.ddp.no_sync():
                    logprobs, mask = self._token_logprobs(self.ddp, trajectories[start:end], temperature)
                    sums = (logprobs * mask).sum(-1)
                    per_sample = k2_policy_loss(sums, old_logprob_sums[start:end], advantage[start:end], config.tau)
                    # Sum over micro-batches / samples in the mini-batch = the mini-batch mean;
                    # DDP then averages over ranks, giving the global mean.
                    loss = per_sample.sum() / per_step
                    loss.backward()
                step_loss += loss.item()
                log_ratios.append((sums - old_logprob_sums[start:end]).detach())
            grad_norms.append(torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.max_grad_norm).item())
            self.optimizer.step()
            losses.append(step_loss)
        return {
            "loss": sum(losses) / len(losses),
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "logprob_diff_sum": logprob_diff_sum,
            "response_tokens": response_tokens,
            "log_ratio_abs_mean": torch.cat(log_ratios).abs().mean().item(),
        }

    def publish_weights(self, version: int) -> dict:
        """Rank 0: write the current weights into shared memory; returns the manifest for the engines."""
        assert self.weight_block is not None, "only rank 0 publishes weights"
        return self.weight_block.write(self._full_state(), version).to_dict()

    @torch.no_grad()
    def sequence_logprobs(self, token_ids: list[int]) -> list[float]:
        input_ids = torch.tensor([token_ids], device=self.device)
        logits = self.model(input_ids=input_ids).logits
        return token_logprobs(logits, input_ids, temperature=1.0)[0].tolist()

    def save(self, out_dir: str) -> None:
        """Rank 0: a Hugging Face model directory (weights, config, tokenizer) that vLLM and transformers load."""
        if self.rank != 0:
            return
        self.model.save_pretrained(out_dir)
        AutoTokenizer.from_pretrained(self.model_path).save_pretrained(out_dir)

    def shutdown(self) -> None:
        if self.weight_block is not None:
            self.weight_block.close()
            self.weight_block = None
        if dist.is_initialized():
            dist.destroy_process_group()
