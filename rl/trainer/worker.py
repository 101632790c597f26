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
(rl/trainer/logprobs.py): no micro-batch's whole-vocabulary logits are ever held. The samples of
a micro-batch that share a prompt run through the transformer in rows that hold the prompt once
(rl/trainer/shared_prompts.py).

`train`, `sequence_logprobs`, `broadcast_weights`, `save_model` and `save_state`/`load_state` are
collectives: all ranks must call them, with the same arguments except for the data shard given
to `train`.

Colocated with the engines on GPU, the trainer `offload`s its parameters and optimizer state to
host memory while the engines hold the device; each of those collectives takes back what it needs.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import ray
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from rl.config import TrainerConfig
from rl.records import TrainSample
from rl.trainer.logprobs import PolicyLogprobs
from rl.trainer.losses import MetricMean, TokenBatch, get_loss, loss_denominator, stale_tokens
from rl.trainer.optim import MuonWithAdamW
from rl.trainer.parallel import build_mesh, check_layout, shard_model, whole
from rl.trainer.qk_clip import QKClip
from rl.trainer.shared_prompts import SharedPromptRows, can_share_prompts, pack, prompt_groups
from rl.trainer.state import load_train_state, save_train_state
from rl.weight_sync.relay import send_to_relays
from rl.weight_sync.transport import BucketPlan, BucketWriter, WeightUpdate

_RENDEZVOUS_TIMEOUT = timedelta(minutes=10)


@dataclass
class MicroBatch:
    """Right-padded sequences [B, T] and, over their logprob positions [B, T - 1], what the loss reads."""

    input_ids: torch.Tensor
    attention: torch.Tensor
    loss_mask: torch.Tensor
    rollout_logprobs: torch.Tensor
    temperatures: torch.Tensor
    versions: torch.Tensor
    advantages: torch.Tensor  # [B]
    # The same samples in rows that hold each prompt once, for the forward (rl/trainer/shared_prompts.py).
    shared_prompts: SharedPromptRows | None = None

    @classmethod
    def of(cls, samples: list[TrainSample], device: torch.device, shared_prompt_row_tokens: int = 0) -> MicroBatch:
        """Right-padded ids and, over the logprob positions, what the loss needs of each token; with
        `shared_prompt_row_tokens`, also the samples packed into rows of at most that many tokens
        that hold each prompt once."""
        width = max(len(s.token_ids) for s in samples)
        input_ids = torch.zeros(len(samples), width, dtype=torch.long)
        attention = torch.zeros(len(samples), width, dtype=torch.long)
        loss_mask = torch.zeros(len(samples), width - 1)
        rollout = torch.zeros(len(samples), width - 1)
        temperatures = torch.ones(len(samples), width - 1)
        versions = torch.full((len(samples), width - 1), -1, dtype=torch.long)
        for i, sample in enumerate(samples):
            length = len(sample.token_ids)
            input_ids[i, :length] = torch.tensor(sample.token_ids)
            attention[i, :length] = 1
            # Position t predicts token t + 1: the response's first token is predicted at prompt_len - 1.
            span = slice(sample.prompt_len - 1, length - 1)
            loss_mask[i, span] = torch.tensor(sample.loss_mask, dtype=torch.float)
            rollout[i, span] = torch.tensor(sample.rollout_logprobs)
            temperatures[i, span] = torch.tensor(sample.temperatures).where(loss_mask[i, span] > 0, 1.0)
            versions[i, span] = torch.tensor(sample.versions)
        advantages = torch.tensor([s.advantage for s in samples])
        shared = pack(samples, shared_prompt_row_tokens) if shared_prompt_row_tokens else None
        return cls(*(t.to(device) for t in (input_ids, attention, loss_mask, rollout, temperatures, versions, advantages)),
                   shared_prompts=None if shared is None else shared.to(device))


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
        self.loss = get_loss(config.loss)(config.loss_settings())
        self.seed = seed
        use_cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        if not use_cuda:
            # Trainer ranks share the machine's cores with each other and with the engines.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        self.weight_writer: BucketWriter | None = None
        self.offloaded: set[str] = set()  # "parameters", "optimizer": on the host (colocated on GPU)
        self.store: dist.TCPStore | None = None  # rank 0's, once `rendezvous_address` opened it

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0: open the process group's store on this node, on a port the system picks, and
        say where it listens. Holding the socket from here on means no other process can take the
        port between choosing it and forming the group."""
        address = ray.util.get_node_ip_address()
        self.store = dist.TCPStore(address, 0, self.world_size, is_master=True, timeout=_RENDEZVOUS_TIMEOUT,
                                   wait_for_workers=False)
        return address, self.store.port

    def parameter_count(self) -> int:
        return sum(param.numel() for param in _unique(list(self.model.parameters())))

    def device_memory_bytes(self) -> int:
        """The memory this rank may use: its GPU's, or its share of the host's."""
        if self.device.type == "cuda":
            return torch.cuda.get_device_properties(self.device).total_memory
        import psutil

        return psutil.virtual_memory().total // self.world_size

    def join(self, address: str, port: int, interface: str, strategy: str = "fsdp") -> None:
        """Form the process group, give every rank rank 0's weights, shard (data-parallel `strategy`:
        "fsdp" or "replicate"), build the optimizer."""
        store = self.store or dist.TCPStore(address, port, self.world_size, is_master=self.rank == 0,
                                            timeout=_RENDEZVOUS_TIMEOUT, wait_for_workers=False)
        interface = interface or _interface_of(ray.util.get_node_ip_address())
        if interface:
            os.environ["GLOO_SOCKET_IFNAME"] = os.environ["NCCL_SOCKET_IFNAME"] = interface
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size, timeout=_RENDEZVOUS_TIMEOUT)
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
        shard_model(model, mesh, self.compute_dtype, strategy)
        self.optimizer = MuonWithAdamW(model, self.config)
        # The ranks that train on different data: what a loss's denominator is summed over.
        self.dp_group = mesh["dp"].get_group() if mesh["dp"].size() > 1 else None

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

    def broadcast_weights(self, update: WeightUpdate, relays: list = ()) -> None:
        """A collective: every rank gathers each bucket, each node's writer writes it for its engines,
        and the rank given `relays` (the first) sends it on to the nodes without a trainer rank."""
        gathered = self.iter_full_tensors(update.plan.names)
        try:
            tensors = send_to_relays(relays, update, gathered) if relays else gathered
            if self.weight_writer is not None:
                self.weight_writer.write(update, tensors)
            else:
                for _ in tensors:
                    pass
        finally:
            for _ in gathered:  # every rank takes part in every gather, also after a failure here
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

    def _shared_prompt_row_tokens(self) -> int:
        return self.config.shared_prompt_row_tokens if can_share_prompts(self.causal_lm.config) else 0

    def _micro_batch(self, samples: list[TrainSample]) -> MicroBatch:
        return MicroBatch.of(samples, self.device, self._shared_prompt_row_tokens())

    def _token_logprobs(self, batch: MicroBatch) -> torch.Tensor:
        logprobs = self.model(batch.input_ids, batch.attention, batch.temperatures, batch.shared_prompts)
        if not torch.is_grad_enabled():
            # The replicated strategy's root module keeps its parameters gathered after a forward
            # until the backward (FSDP2's root is told to reshard after forward, rl/trainer/parallel.py).
            # With no backward to come, a state dict saved or loaded next would find them gathered.
            self.model.reshard()
        return logprobs

    def train(self, samples: list[TrainSample], policy_version: int, ptx: list[TrainSample] = (),
              ptx_coef: float = 0.0, skipped_units: float = 0.0, lr: float | None = None) -> dict[str, float | tuple[float, float]]:
        """One batch (this data-parallel group's shard, the same size on every rank) in
        `optimizer_steps_per_batch` mini-batches of micro-batches: `train_step` each. `ptx` (split
        over the mini-batches the same way) adds K2's PTX loss, `ptx_coef` times the mean next-token
        loss over its masked tokens.

        pi_old is the policy before this batch. With one optimizer step per batch that is the policy
        of the training forward itself, so its logprobs (detached) serve; with several, a first pass
        computes them. `policy_version` is pi_old's weight version: tokens older than it are stale.
        `skipped_units` are this rank's share of the denominator units of samples left out of the batch
        because their gradient is zero (`PolicyLoss.without_zero_gradients`; one optimizer step only).
        `lr`, this step's learning rate (`trainer.lr` may be a schedule), holds for all its optimizer
        steps; None keeps the current one.

        Metrics come as (total, count) pairs where ranks merge by adding; with QK-Clip on they include
        `max_attention_logit`, the largest logit of any head before its clip.
        """
        self._on_device(with_optimizer=True)
        config = self.config
        if config.reset_optimizer_each_step:
            self.optimizer = MuonWithAdamW(self.model, config)
        if lr is not None:
            self.optimizer.set_lr(lr)
        steps = config.optimizer_steps_per_batch
        if skipped_units and steps > 1:
            raise ValueError("samples may be left out of a batch only with one optimizer step per batch")
        mini_batches = self._mini_batches(samples, steps)
        ptx_batches = self._mini_batches(list(ptx), steps)
        old_logprobs = None
        metrics: list[dict[str, MetricMean | float]] = []
        if steps > 1:
            with torch.no_grad():
                old_logprobs = [[self._token_logprobs(micro) for micro in mini] for mini in mini_batches]
            metrics.append({"logprob_diff_mean": sum(
                (_rollout_gap(old, micro, policy_version) for mini, olds in zip(mini_batches, old_logprobs)
                 for micro, old in zip(mini, olds)), MetricMean())})
        for step, mini in enumerate(mini_batches):
            old = None if old_logprobs is None else old_logprobs[step]
            metrics.append(self.train_step(mini, old, policy_version, ptx_batches[step], ptx_coef, skipped_units))
        merged: dict[str, float | tuple[float, float]] = {}
        for step_metrics in metrics:
            for name, mean in step_metrics.items():
                if isinstance(mean, MetricMean):
                    total, count = merged.get(name, (0.0, 0.0))
                    merged[name] = (total + mean.total, count + mean.count)
                else:
                    merged[name] = max(merged.get(name, mean), mean) if name == "max_attention_logit" else mean
        return merged

    def _mini_batches(self, samples: list[TrainSample], steps: int) -> list[list[MicroBatch]]:
        """`steps` equal mini-batches of micro-batches of at most `trainer.micro_batch_size`. Within a
        mini-batch, samples of one prompt share a micro-batch when their prompt is computed once
        (`trainer.shared_prompt_row_tokens`), and samples of similar length otherwise, so that little
        of it is padding: the mini-batch's loss and gradient are sums over its samples, whatever
        their grouping."""
        per_step, micro = len(samples) // steps, self.config.micro_batch_size
        mini_batches = []
        for step in range(steps):
            shard = samples[step * per_step : (step + 1) * per_step]
            if self._shared_prompt_row_tokens():
                groups = sorted(prompt_groups(shard), key=lambda group: sum(len(sample.token_ids) for sample in group))
                ordered = [sample for group in groups for sample in group]
            else:
                ordered = sorted(shard, key=lambda sample: len(sample.token_ids))
            mini_batches.append([self._micro_batch(ordered[start : start + micro]) for start in range(0, per_step, micro)])
        return mini_batches

    def train_step(self, mini_batch: list[MicroBatch], old_logprobs: list[torch.Tensor] | None,
                   policy_version: int, ptx: list[MicroBatch] = (), ptx_coef: float = 0.0,
                   skipped_units: float = 0.0) -> dict[str, MetricMean | float]:
        """One optimizer step: gradients accumulated over the micro-batches (the policy's, then
        PTX's), clipped, Muon/AdamW, QK-Clip. `skipped_units` count in the loss's denominator
        beside the micro-batches' own."""
        self.optimizer.zero_grad()
        if self.qk_clip is not None:
            self.qk_clip.reset()
        units = sum(self.loss.units(micro.loss_mask) for micro in mini_batch) + skipped_units
        denominator = loss_denominator(units, self.dp_group)
        metrics: dict[str, MetricMean | float] = {}
        loss = 0.0
        last = len(mini_batch) + len(ptx) - 1
        for index, micro in enumerate(mini_batch):
            # Gradients stay unreduced, and accumulate, until the last micro-batch.
            self.model.set_requires_gradient_sync(index == last)
            old = None if old_logprobs is None else old_logprobs[index]
            micro_loss, micro_metrics = self.forward_backward_step(micro, old, denominator, policy_version)
            loss += micro_loss
            for name, mean in micro_metrics.items():
                metrics[name] = metrics.get(name, MetricMean()) + mean
        if ptx:
            ptx_tokens = loss_denominator(sum(micro.loss_mask.sum().item() for micro in ptx), self.dp_group)
            for index, micro in enumerate(ptx, start=len(mini_batch)):
                self.model.set_requires_gradient_sync(index == last)
                nll = -(self._token_logprobs(micro) * micro.loss_mask).sum()
                (ptx_coef * nll / ptx_tokens).backward()
                metrics["ptx_loss"] = metrics.get("ptx_loss", MetricMean()) + MetricMean(nll.item(), micro.loss_mask.sum().item())
        # Each rank's loss is scaled for FSDP2's average over the ranks: their mean is the mini-batch loss.
        metrics["loss"] = MetricMean(loss, 1.0)
        # The parameters are DTensors, so is the norm: gathering it gives every rank the global value.
        total_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        metrics["grad_norm"] = MetricMean(whole(total_norm).item(), 1.0)
        self.optimizer.step()
        if self.qk_clip is not None:
            metrics["max_attention_logit"] = self.qk_clip.clip().max().item()
        return metrics

    def forward_backward_step(self, micro: MicroBatch, old_logprobs: torch.Tensor | None, denominator: float,
                              policy_version: int) -> tuple[float, dict[str, MetricMean]]:
        """Loss and gradients of one micro-batch; returns its loss and metrics. Without `old_logprobs`,
        pi_old is this forward's own policy (one optimizer step per batch)."""
        logprobs = self._token_logprobs(micro)
        old = logprobs.detach() if old_logprobs is None else old_logprobs
        stale = stale_tokens(micro.versions, policy_version)
        output = self.loss(
            TokenBatch(logprobs, old, micro.rollout_logprobs, micro.loss_mask, stale, micro.advantages), denominator
        )
        output.loss.backward()
        metrics = dict(output.metrics)
        if old_logprobs is None:
            metrics["logprob_diff_mean"] = _rollout_gap(old, micro, policy_version)
        return output.loss.item(), metrics

    @torch.no_grad()
    def ptx_eval(self, samples: list[TrainSample]) -> tuple[float, float]:
        """The summed next-token loss over the masked tokens of `samples`, and their count (a
        collective: every rank takes the same samples)."""
        self._on_device(with_optimizer=False)
        nll, tokens = 0.0, 0.0
        for start in range(0, len(samples), self.config.micro_batch_size):
            micro = self._micro_batch(samples[start : start + self.config.micro_batch_size])
            nll -= (self._token_logprobs(micro) * micro.loss_mask).sum().item()
            tokens += micro.loss_mask.sum().item()
        return nll, tokens

    @torch.no_grad()
    def sequence_logprobs(self, token_ids: list[int]) -> list[float]:
        """Per-token logprobs of one sequence; a collective: every rank must call it with the same ids."""
        self._on_device(with_optimizer=False)
        n = len(token_ids) - 1
        sample = TrainSample(list(token_ids), 1, [1] * n, [0.0] * n, [1.0] * n, [0] * n, 0.0)
        return self._token_logprobs(self._micro_batch([sample]))[0].tolist()

    def save_model(self, out_dir: str) -> None:
        """A Hugging Face model directory (weights, config, tokenizer) that vLLM and transformers load,
        in the engines' dtype. A collective: every rank gathers the full tensors, rank 0 writes them."""
        state = {}
        for name, tensor in self.iter_full_tensors(list(self._engine_state())):
            if self.rank == 0:
                state[name] = tensor.detach().to(self.compute_dtype).clone()
        if self.rank == 0:
            self.causal_lm.save_pretrained(out_dir, state_dict=state)
            # save_pretrained records the dtype of the (float32 master) parameters: the weights are in the engines' dtype.
            config = copy.deepcopy(self.causal_lm.config)
            config.dtype = self.compute_dtype
            config.save_pretrained(out_dir)
            AutoTokenizer.from_pretrained(self.model_path).save_pretrained(out_dir)

    def reset(self, seed: int) -> None:
        """A collective: the model's weights as read at start (rank 0 reads them again), a fresh
        optimizer and the RNG seeded as at start, so that a new run on these ranks begins where one
        on fresh ranks would."""
        self._on_device(with_optimizer=True)
        weights = _load_or_skeleton(self.model_path, read_weights=True).state_dict() if self.rank == 0 else {}
        set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        self.optimizer = MuonWithAdamW(self.model, self.config)
        self.optimizer.zero_grad()
        self.seed = seed
        torch.manual_seed(seed)

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
        self.store = None


def _rollout_gap(old_logprobs: torch.Tensor, micro: MicroBatch, policy_version: int) -> MetricMean:
    """How far pi_old's logprobs are from the engine's: the engine sampled with pi_old's weights, so
    they should agree (tokens of older versions excepted)."""
    fresh = micro.loss_mask * ~stale_tokens(micro.versions, policy_version)
    return MetricMean(((old_logprobs - micro.rollout_logprobs).abs() * fresh).sum().item(), fresh.sum().item())


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
                # psutil gives an IPv6 netmask as an address (ffff:...), which ip_network only takes as a prefix length.
                prefix = bin(int(ipaddress.ip_address(item.netmask.split('%')[0]))).count("1")
                network = ipaddress.ip_network(f"{item.address.split('%')[0]}/{prefix}", strict=False)
                if target in network:
                    return name
    return ""
