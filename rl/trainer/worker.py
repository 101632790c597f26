"""Trainer workers: Ray actors that form one torch.distributed group and update the policy.

The ranks (gloo on CPU, NCCL on GPU) form a data_parallel_size x tensor_parallel_size
mesh (rl/trainer/parallel.py): each data-parallel group of tp ranks holds one tensor-parallel
copy of the policy, sharded by FSDP2 over the data-parallel ranks, and trains on its
shard of the batch (the tp ranks of a group on the same shard):

    train_step:  recompute pi_old logprobs  ->  for each mini-batch: forward_backward_step on each
                 micro-batch (gradient accumulation)  ->  reduce-scatter  ->  clip  ->
                 Muon/AdamW step  ->  QK-Clip

Parameters and optimizer state are float32 (master weights); with `model.dtype` bfloat16 or
float16 the forward and backward compute in that dtype (FSDP2 mixed precision), as the engines do.
Logprobs come from the final hidden states `trainer.logprob_chunk_size` positions at a time
(rl/trainer/logprobs.py): no micro-batch's whole-vocabulary logits are ever held.

`train`, `sequence_logprobs`, `broadcast_weights`, `save_model` and `save_state`/`load_state` are
collectives: all ranks must call them, with the same arguments except for the data shard given
to `train`.

Colocated with the engines on GPU, the trainer `offload`s its parameters and optimizer state to
host memory while the engines hold the device; each of those collectives takes back what it needs.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import ray
import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rl.config import TrainerConfig
from rl.records import TrainSample
from rl.trainer.logprobs import PolicyLogprobs
from rl.trainer.loss import k2_policy_loss
from rl.trainer.optim import MuonWithAdamW
from rl.trainer.parallel import build_mesh, check_layout, shard_model, whole
from rl.trainer.qk_clip import QKClip
from rl.trainer.state import load_train_state, save_train_state
from rl.weight_sync.transport import BucketPlan, BucketWriter, WeightUpdate


class TrainerWorker:
    """Run as a Ray actor. Rank 0 reads the checkpoint; the first rank on each node with engines
    is that node's weight-sync writer.

    Starting takes two calls: the constructor reads the model (rank 0) or builds its skeleton
    (the others); `join` then forms the process group at rank 0's `rendezvous_address`.
    """

    def __init__(self, rank: int, world_size: int, model_path: str, dtype: str, config: TrainerConfig, seed: int):
        self.rank, self.world_size, self.config = rank, world_size, config
        self.model_path = model_path
        self.compute_dtype = getattr(torch, dtype)
        # Master weights stay in float32 whatever the compute dtype.
        causal_lm = _load_or_skeleton(model_path, read_weights=rank == 0)
        causal_lm.config.use_cache = False
        # Before any process group exists, so that a bad layout leaves nothing to clean up.
        check_layout(config, world_size, causal_lm.config)
        # The Hugging Face model, for what only it does (tying weights, choosing the attention
        # implementation, saving); `model` holds the same parameters, and is what trains.
        self.causal_lm = causal_lm
        self.model = PolicyLogprobs(causal_lm, config.logprob_chunk_size)
        self.seed = seed
        use_cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        if not use_cuda:
            # Trainer ranks share the machine's cores with each other and with the engines.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        self.weight_writer: BucketWriter | None = None
        self.offloaded: set[str] = set()  # "parameters", "optimizer": on the host (colocated on GPU)

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0: this node's address and a free port on it, where the process group forms."""
        address = ray.util.get_node_ip_address()
        with socket.socket() as sock:
            sock.bind((address, 0))
            return address, sock.getsockname()[1]

    def join(self, address: str, port: int, interface: str) -> None:
        """Form the process group, give every rank rank 0's weights, shard, build the optimizer."""
        os.environ.update(MASTER_ADDR=address, MASTER_PORT=str(port))
        interface = interface or _interface_of(ray.util.get_node_ip_address())
        if interface:
            os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = interface
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=self.rank, world_size=self.world_size, timeout=timedelta(minutes=10))
        torch.manual_seed(self.seed)
        mesh = build_mesh(self.config, self.device.type)
        model = self.model
        if self.rank == 0:
            model.to(self.device)
        else:
            model.to_empty(device=self.device)
            # `to_empty` gives every parameter new storage, which unties tied embeddings.
            self.causal_lm.tie_weights()
        with torch.no_grad():
            # The checkpoint is read from disk once: the other ranks get it from rank 0.
            for tensor in _unique([*model.parameters(), *model.buffers()]):
                dist.broadcast(tensor, src=0)
        self.qk_clip = QKClip(self.causal_lm, self.config.qk_clip_threshold, mesh) if self.config.qk_clip_threshold > 0 else None
        shard_model(model, mesh, self.compute_dtype)
        self.optimizer = MuonWithAdamW(model, self.config)

    def weight_layout(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, full shape) of every tensor the engines load, in the engines' dtype. A tied
        output head is the input embedding: it is sent once, as the embedding."""
        dtype = str(self.compute_dtype).removeprefix("torch.")
        return [(name, dtype, tuple(tensor.shape)) for name, tensor in self._engine_state().items()]

    def node_id(self) -> str:
        return self.node

    def open_weight_writer(self, plan: BucketPlan, local_readers: tuple[int, ...]) -> None:
        """Called on the first rank of each node that runs engines: become the node's weight-sync
        writer and create the shared-memory block those engines load from."""
        self.weight_writer = BucketWriter(plan, self.node, local_readers)

    @ray.method(concurrency_group="control")
    def mark_reader_failed(self, reader: int, update_id: int) -> None:
        """An engine of this node died during `update_id`: the writer stops waiting for it. Runs beside
        a `broadcast_weights` in progress, which is what it unblocks."""
        self.weight_writer.mark_reader_failed(reader, update_id)

    def broadcast_weights(self, update: WeightUpdate) -> None:
        """A collective: every rank gathers each bucket, each node's writer writes it for its engines."""
        tensors = self.iter_full_tensors(update.plan.names)
        try:
            if self.weight_writer is not None:
                self.weight_writer.write(update, tensors)
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

    def _engine_state(self) -> dict[str, torch.Tensor]:
        state = self.model.state_dict()
        if getattr(self.model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        return state

    def iter_full_tensors(self, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Entries of the Hugging Face state dict (all, or `names` in that order), whole, one at a time.

        A collective: every rank must iterate to the end, and every rank receives each full
        tensor. A tensor may share storage with the parameters: copy it to keep it past
        the next update.
        """
        self._on_device(with_optimizer=False)
        state = self.model.state_dict()
        for name in names if names is not None else list(state):
            yield name, whole(state[name])

    def _batch_tensors(self, samples: list[TrainSample]) -> tuple[torch.Tensor, ...]:
        """Right-padded ids, attention mask, and, over the logprob positions: the loss mask, the
        rollout logprobs and the sampling temperatures."""
        width = max(len(s.token_ids) for s in samples)
        input_ids = torch.zeros(len(samples), width, dtype=torch.long)
        attention = torch.zeros(len(samples), width, dtype=torch.long)
        loss_mask = torch.zeros(len(samples), width - 1)
        rollout = torch.zeros(len(samples), width - 1)
        temperatures = torch.ones(len(samples), width - 1)
        for i, sample in enumerate(samples):
            length = len(sample.token_ids)
            input_ids[i, :length] = torch.tensor(sample.token_ids)
            attention[i, :length] = 1
            # Position t predicts token t + 1: the response's first token is predicted at prompt_len - 1.
            span = slice(sample.prompt_len - 1, length - 1)
            loss_mask[i, span] = torch.tensor(sample.loss_mask, dtype=torch.float)
            rollout[i, span] = torch.tensor(sample.rollout_logprobs)
            temperatures[i, span] = torch.tensor(sample.temperatures).where(loss_mask[i, span] > 0, 1.0)
        tensors = (input_ids, attention, loss_mask, rollout, temperatures)
        return tuple(tensor.to(self.device) for tensor in tensors)

    def _token_logprobs(self, input_ids: torch.Tensor, attention: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention, temperatures)

    def train(self, samples: list[TrainSample]) -> dict[str, float]:
        """One batch (this data-parallel group's shard): pi_old recompute, then `optimizer_steps_per_batch` updates.

        With QK-Clip on, the metrics include `max_attention_logit`: the largest logit of any
        head before its clip, over all ranks and optimizer steps of the batch.
        """
        self._on_device(with_optimizer=True)
        config = self.config
        if config.reset_optimizer_each_step:
            self.optimizer = MuonWithAdamW(self.model, config)
        micro_batches = [self._batch_tensors(samples[start : start + config.micro_batch_size])
                         for start in range(0, len(samples), config.micro_batch_size)]
        logprob_diff_sum, response_tokens = 0.0, 0.0
        old_sums = []
        with torch.no_grad():
            for input_ids, attention, mask, rollout, temperatures in micro_batches:
                logprobs = self._token_logprobs(input_ids, attention, temperatures)
                old_sums.append((logprobs * mask).sum(-1))
                logprob_diff_sum += ((logprobs - rollout).abs() * mask).sum().item()
                response_tokens += mask.sum().item()
        old_logprob_sums = torch.cat(old_sums)
        advantage = torch.tensor([s.advantage for s in samples], device=self.device)

        steps = config.optimizer_steps_per_batch
        per_step = len(samples) // steps
        losses, grad_norms, log_ratios, max_logits = [], [], [], []
        for step in range(steps):
            lo, hi = step * per_step, (step + 1) * per_step
            self.optimizer.zero_grad()
            if self.qk_clip is not None:
                self.qk_clip.reset()
            starts = list(range(lo, hi, config.micro_batch_size))
            step_loss = 0.0
            for index, start in enumerate(starts):
                end = min(start + config.micro_batch_size, hi)
                # Gradients stay unreduced, and accumulate, until the last micro-batch.
                self.model.set_requires_gradient_sync(index == len(starts) - 1)
                batch = self._batch_tensors(samples[start:end])
                loss, sums = self.forward_backward_step(batch, old_logprob_sums[start:end], advantage[start:end], per_step)
                step_loss += loss
                log_ratios.append((sums - old_logprob_sums[start:end]).detach())
            # The parameters are DTensors, so is the norm: gathering it gives every rank the global value.
            total_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), config.max_grad_norm)
            grad_norms.append(whole(total_norm).item())
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

    def forward_backward_step(self, batch: tuple[torch.Tensor, ...], old_logprob_sums: torch.Tensor,
                              advantages: torch.Tensor, mini_batch_size: int) -> tuple[float, torch.Tensor]:
        """Loss and gradients of one micro-batch; returns the loss and the sequences' log pi."""
        input_ids, attention, mask, _, temperatures = batch
        logprobs = self._token_logprobs(input_ids, attention, temperatures)
        sums = (logprobs * mask).sum(-1)
        per_sample = k2_policy_loss(sums, old_logprob_sums, advantages, self.config.tau)
        # Sum over micro-batches / samples in the mini-batch = the mini-batch mean;
        # FSDP2 then averages over the data-parallel ranks, giving the global mean.
        loss = per_sample.sum() / mini_batch_size
        loss.backward()
        return loss.item(), sums

    @torch.no_grad()
    def sequence_logprobs(self, token_ids: list[int]) -> list[float]:
        """Per-token logprobs of one sequence; a collective: every rank must call it with the same ids."""
        self._on_device(with_optimizer=False)
        input_ids = torch.tensor([token_ids], device=self.device)
        attention = torch.ones_like(input_ids)
        temperatures = torch.ones(1, len(token_ids) - 1, device=self.device)
        return self._token_logprobs(input_ids, attention, temperatures)[0].tolist()

    def save_model(self, out_dir: str) -> None:
        """A Hugging Face model directory (weights, config, tokenizer) that vLLM and transformers load,
        in the engines' dtype. A collective: every rank gathers the full tensors, rank 0 writes them."""
        state = {}
        for name, tensor in self.iter_full_tensors(list(self._engine_state())):
            if self.rank == 0:
                state[name] = tensor.detach().to(self.compute_dtype).clone()
        if self.rank == 0:
            self.causal_lm.config.torch_dtype = self.compute_dtype
            self.causal_lm.save_pretrained(out_dir, state_dict=state)
            AutoTokenizer.from_pretrained(self.model_path).save_pretrained(out_dir)

    def save_state(self, directory: str) -> None:
        """A collective: parameters, optimizer state and RNG into a run checkpoint's trainer folder."""
        self._on_device(with_optimizer=True)
        save_train_state(Path(directory), self.model, self.optimizer, self.rank)

    def load_state(self, directory: str) -> None:
        """A collective: the trainer state saved by `save_state`, into this (possibly re-laid-out) mesh."""
        self._on_device(with_optimizer=True)
        load_train_state(Path(directory), self.model, self.optimizer, self.rank)

    def shutdown(self) -> None:
        if self.weight_writer is not None:
            self.weight_writer.close()
            self.weight_writer = None
        if dist.is_initialized():
            dist.destroy_process_group()


def _load_or_skeleton(model_path: str, read_weights: bool):
    """The model with its weights read from disk, or (`read_weights` False) an uninitialised
    skeleton of the same architecture whose storage is allocated later, to receive them."""
    if read_weights:
        return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path), dtype=torch.float32)


def _unique(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor once (tied weights are one tensor under two names)."""
    seen: set[int] = set()
    return [t for t in tensors if id(t) not in seen and not seen.add(id(t))]


def _interface_of(address: str) -> str:
    """The network interface whose network holds `address` ("lo" for any 127.x address), or "" if none does."""
    import ipaddress
    import socket

    import psutil

    target = ipaddress.ip_address(address)
    for name, addresses in psutil.net_if_addrs().items():
        for item in addresses:
            if item.family in (socket.AF_INET, socket.AF_INET6) and item.netmask:
                network = ipaddress.ip_network(f"{item.address.split('%')[0]}/{item.netmask}", strict=False)
                if target in network:
                    return name
    return ""
