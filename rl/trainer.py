"""Trainer workers: Ray actors that form one torch.distributed group and update the policy.

The ranks (gloo on CPU, NCCL on GPU) form a data_parallel_size x tensor_parallel_size
mesh (rl/parallel.py): each data-parallel group of tp ranks holds one tensor-parallel
copy of the policy, sharded by FSDP2 over the data-parallel ranks, and trains on its
shard of the batch (the tp ranks of a group on the same shard):

    recompute pi_old logprobs  ->  for each mini-batch: micro-batches with gradient
    accumulation  ->  reduce-scatter  ->  clip  ->  Muon/AdamW step  ->  QK-Clip

`train`, `sequence_logprobs`, `broadcast_weights` and `save` are collectives: all ranks must
call them, with the same arguments except for the data shard given to `train`.

Colocated with the engines on GPU, the trainer `offload`s its parameters and optimizer state to
host memory while the engines hold the device; each of those collectives takes back what it needs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta

import ray
import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rl.checkpoint_engine import BucketPlan, CheckpointWriter, WeightUpdate, layout_of
from rl.config import TrainerConfig
from rl.loss import k2_policy_loss, token_logprobs
from rl.optim import MuonWithAdamW
from rl.parallel import build_mesh, check_layout, shard_model, whole
from rl.qk_clip import QKClip
from rl.records import Trajectory


class TrainerWorker:
    """Run as a Ray actor. Rank 0 reads the checkpoint; the first rank on each node with engines
    is that node's checkpoint-engine worker."""

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
        self.model_path = model_path
        model = _load_or_skeleton(model_path, dtype, read_weights=rank == 0)
        model.config.use_cache = False
        # Before any process group exists, so that a bad layout leaves nothing to clean up.
        check_layout(config, world_size, model.config)
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
        mesh = build_mesh(config, self.device.type)
        if rank == 0:
            model.to(self.device)
        else:
            model.to_empty(device=self.device)
        with torch.no_grad():
            # The checkpoint is read from disk once: the other ranks get it from rank 0.
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor, src=0)
        self.qk_clip = QKClip(model, config.qk_clip_threshold, mesh) if config.qk_clip_threshold > 0 else None
        shard_model(model, mesh)
        self.model = model
        self.optimizer = MuonWithAdamW(model, config)
        self.checkpoint_writer: CheckpointWriter | None = None
        self.offloaded: set[str] = set()  # "parameters", "optimizer": on the host (colocated on GPU)

    def weight_layout(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, full shape) of every state-dict entry, for planning the checkpoint engine's buckets."""
        return layout_of(self.model.state_dict())

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def open_checkpoint_engine(self, plan: BucketPlan, local_readers: tuple[int, ...]) -> None:
        """Called on the first rank of each node that runs engines: become the node's
        checkpoint-engine worker and create the shared-memory block those engines load from."""
        self.checkpoint_writer = CheckpointWriter(plan, local_readers)

    def broadcast_weights(self, update: WeightUpdate) -> None:
        """A collective: every rank gathers each bucket, each node's worker writes it for its engines."""
        tensors = self.iter_full_tensors(update.plan.names)
        try:
            if self.checkpoint_writer is not None:
                self.checkpoint_writer.write(update, tensors)
        finally:
            for _ in tensors:  # every rank takes part in every gather, also after a failure here
                pass

    def offload(self, parameters: bool = True) -> None:
        """Free the device for the engines: optimizer state (and, with `parameters`, the
        parameters) to host memory, gradients dropped. A collective takes back what it needs:
        `train` everything, the gathers and `sequence_logprobs` the parameters alone."""
        self.optimizer.zero_grad()
        if "optimizer" not in self.offloaded:
            self._move_optimizer_state(torch.device("cpu"))
            self.offloaded.add("optimizer")
        if parameters and "parameters" not in self.offloaded:
            # FSDP2 keeps its sharded parameters registered across `Module.to`, and DTensor
            # parameters are swapped in place, so the optimizer's references stay valid.
            self.model.to("cpu")
            self.offloaded.add("parameters")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _on_device(self, with_optimizer: bool) -> None:
        if "parameters" in self.offloaded:
            self.model.to(self.device)
            self.offloaded.discard("parameters")
        if with_optimizer and "optimizer" in self.offloaded:
            self._move_optimizer_state(self.device)
            self.offloaded.discard("optimizer")

    def _move_optimizer_state(self, device: torch.device) -> None:
        for optimizer in self.optimizer.optimizers:
            for group in optimizer.param_groups:
                # Unless fused or capturable, AdamW keeps its step count on the host.
                step_on_device = group.get("fused") or group.get("capturable")
                for param in group["params"]:
                    state = optimizer.state.get(param, {})
                    for key, value in state.items():
                        if isinstance(value, torch.Tensor) and (key != "step" or step_on_device):
                            state[key] = value.to(device, non_blocking=True)

    def iter_full_tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Entries of the Hugging Face state dict (all, or `names` in that order), whole, one at a time.

        A collective: every rank must iterate to the end, and every rank receives each full
        tensor. A tensor may share storage with the parameters: copy it to keep it past
        the next update.
        """
        self._on_device(with_optimizer=False)
        state = self.model.state_dict()
        for name in names if names is not None else list(state):
            tensor = state[name]
            yield name, whole(tensor)

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

    def _token_logprobs(self, trajectories: list[Trajectory], temperature: float):
        input_ids, attention, response_mask = self._batch_tensors(trajectories)
        logits = self.model(input_ids=input_ids, attention_mask=attention).logits
        return token_logprobs(logits, input_ids, temperature), response_mask

    def train(self, trajectories: list[Trajectory], advantages: list[float], temperature: float) -> dict[str, float]:
        """One batch (this data-parallel group's shard): pi_old recompute, then `optimizer_steps_per_batch` updates.

        With QK-Clip on, the metrics include `max_attention_logit`: the largest logit of any
        head before its clip, over all ranks and optimizer steps of the batch.
        """
        self._on_device(with_optimizer=True)
        config = self.config
        if config.reset_optimizer_each_step:
            self.optimizer = MuonWithAdamW(self.model, config)
        micro = config.micro_batch_size
        logprob_diff_sum, response_tokens = 0.0, 0.0
        old_sums = []
        with torch.no_grad():
            for start in range(0, len(trajectories), micro):
                chunk = trajectories[start : start + micro]
                logprobs, mask = self._token_logprobs(chunk, temperature)
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
        losses, grad_norms, log_ratios, max_logits = [], [], [], []
        for step in range(steps):
            lo, hi = step * per_step, (step + 1) * per_step
            self.optimizer.zero_grad()
            if self.qk_clip is not None:
                self.qk_clip.reset()
            micro_starts = list(range(lo, hi, micro))
            step_loss = 0.0
            for index, start in enumerate(micro_starts):
                end = min(start + micro, hi)
                # Gradients stay unreduced, and accumulate, until the last micro-batch.
                self.model.set_requires_gradient_sync(index == len(micro_starts) - 1)
                logprobs, mask = self._token_logprobs(trajectories[start:end], temperature)
                sums = (logprobs * mask).sum(-1)
                per_sample = k2_policy_loss(sums, old_logprob_sums[start:end], advantage[start:end], config.tau)
                # Sum over micro-batches / samples in the mini-batch = the mini-batch mean;
                # FSDP2 then averages over the data-parallel ranks, giving the global mean.
                loss = per_sample.sum() / per_step
                loss.backward()
                step_loss += loss.item()
                log_ratios.append((sums - old_logprob_sums[start:end]).detach())
            # The parameters are DTensors, so is the norm: gathering it gives every rank the global value.
            total_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
            grad_norms.append(total_norm.full_tensor().item())
            self.optimizer.step()
            if self.qk_clip is not None:
                max_logits.append(self.qk_clip.clip().max().item())
            losses.append(step_loss)
        metrics = {
            "loss": sum(losses) / len(losses),
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "logprob_diff_sum": logprob_diff_sum,
            "response_tokens": response_tokens,
            "log_ratio_abs_mean": torch.cat(log_ratios).abs().mean().item(),
        }
        if max_logits:
            metrics["max_attention_logit"] = max(max_logits)
        return metrics

    @torch.no_grad()
    def sequence_logprobs(self, token_ids: list[int]) -> list[float]:
        """Per-token logprobs of one sequence; a collective: every rank must call it with the same ids."""
        self._on_device(with_optimizer=False)
        input_ids = torch.tensor([token_ids], device=self.device)
        logits = self.model(input_ids=input_ids).logits
        return token_logprobs(logits, input_ids, temperature=1.0)[0].tolist()

    def save(self, out_dir: str) -> None:
        """A Hugging Face model directory (weights, config, tokenizer) that vLLM and transformers load.

        A collective: every rank gathers the full tensors, rank 0 writes them.
        """
        state = {}
        for name, tensor in self.iter_full_tensors():
            if self.rank == 0:
                state[name] = tensor
        if self.rank == 0:
            self.model.save_pretrained(out_dir, state_dict=state)
            AutoTokenizer.from_pretrained(self.model_path).save_pretrained(out_dir)

    def shutdown(self) -> None:
        if self.checkpoint_writer is not None:
            self.checkpoint_writer.close()
            self.checkpoint_writer = None
        if dist.is_initialized():
            dist.destroy_process_group()


def _load_or_skeleton(model_path: str, dtype: str, read_weights: bool):
    """The model with its weights read from disk, or (`read_weights` False) an uninitialised
    skeleton of the same architecture whose storage is allocated later, to receive them."""
    if read_weights:
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path), dtype=getattr(torch, dtype))
