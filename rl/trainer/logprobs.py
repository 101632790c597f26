"""Token logprobs of the policy: log pi(token_t | tokens_<t), at the temperature each token was sampled with.

`token_logprobs` works on whole logits: the reference, for a model run outside the trainer. The
trainer never holds those: a micro-batch's [tokens, vocabulary] float32 logits reach gigabytes with
a 150k vocabulary. `PolicyLogprobs` runs the transformer body, then applies the output head to
`chunk_size` positions at a time and keeps only each position's logprob. Every chunk but the last
is checkpointed (torch.utils.checkpoint): the backward pass recomputes its logits one chunk at a
time, so the largest tensor of a forward and backward is [chunk_size, vocabulary].

With tensor parallelism the head is split by vocabulary rows (rl/trainer/parallel.py), and the
log-softmax is vocabulary-parallel as in Megatron-LM: each rank computes the logits of its rows, the
maximum and the sum of exponentials are all-reduced over the tensor-parallel group, and the target
token's logit comes from the rank that holds its row. No rank ever holds logits of the whole vocabulary.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed import ProcessGroup
from torch.distributed.tensor import DTensor, Replicate
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from rl.config import ConfigError
from rl.trainer.shared_prompts import SharedPromptRows

# A temperature of 0 (greedy decoding) has no distribution; its tokens are never trained on.
_MIN_TEMPERATURE = 1e-6


def token_logprobs(logits: Tensor, input_ids: Tensor, temperatures: Tensor | float) -> Tensor:
    """log pi(token_t | tokens_<t) for t >= 1, shape [batch, seq - 1].

    Logits are divided by the sampling temperature (one number, or one per position [batch, seq - 1]),
    so these are the logprobs of the distribution the rollout engine actually sampled from.
    """
    if isinstance(temperatures, Tensor):
        temperatures = temperatures.clamp(min=_MIN_TEMPERATURE).unsqueeze(-1)
    else:
        temperatures = max(temperatures, _MIN_TEMPERATURE)
    scaled = logits[:, :-1].float() / temperatures
    return torch.log_softmax(scaled, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


def chunked_token_logprobs(hidden: Tensor, head_weight: Tensor, targets: Tensor, temperatures: Tensor, chunk_size: int) -> Tensor:
    """log softmax(hidden @ head_weight.T / temperature)[target], [batch, positions], `chunk_size` positions at a time.

    `hidden` [batch, positions, hidden_size] holds the final hidden states of the positions that
    predict `targets` [batch, positions], sampled at `temperatures` [batch, positions]. A
    `head_weight` split by rows over a tensor-parallel mesh (a DTensor) gives the vocabulary-parallel
    log-softmax; `hidden` is then the same on every rank of that mesh.
    """
    batch, positions = targets.shape
    hidden = hidden.reshape(batch * positions, hidden.shape[-1])
    group, first_row = None, 0
    if isinstance(head_weight, DTensor):
        mesh = head_weight.device_mesh
        group = mesh.get_group()
        # DTensor splits rows as torch.chunk does: every rank but the last ones holds ceil(V / tp).
        rows_per_rank = -(-head_weight.shape[0] // mesh.size())
        first_row = mesh.get_local_rank() * rows_per_rank
        # A replicated DTensor: the backward pass then sums the ranks' partial gradients of the
        # hidden states (each rank's rows contribute their part), once for the whole tensor.
        hidden = DTensor.from_local(hidden, mesh, [Replicate()], run_check=False)
    temperatures = temperatures.reshape(-1).clamp(min=_MIN_TEMPERATURE)
    pieces = list(zip(hidden.split(chunk_size), targets.reshape(-1).split(chunk_size), temperatures.split(chunk_size)))
    chunks = [
        checkpoint(_chunk_logprobs, hidden_chunk, head_weight, target_chunk, temperature_chunk, group, first_row, use_reentrant=False)
        for hidden_chunk, target_chunk, temperature_chunk in pieces[:-1]
    ]
    # The last chunk keeps its activations: the backward pass starts with it, right after the
    # forward, so recomputing them would take as much memory, and time besides.
    hidden_chunk, target_chunk, temperature_chunk = pieces[-1]
    chunks.append(_chunk_logprobs(hidden_chunk, head_weight, target_chunk, temperature_chunk, group, first_row))
    return torch.cat(chunks).view(batch, positions)


def _chunk_logprobs(hidden: Tensor, head_weight: Tensor, targets: Tensor, temperatures: Tensor,
                    group: ProcessGroup | None, first_row: int) -> Tensor:
    """Logprobs of `targets` for one chunk of positions; over this rank's vocabulary rows when `group` is set."""
    logits = hidden @ head_weight.T
    if isinstance(logits, DTensor):
        logits = logits.to_local()
    scaled = logits.float() / temperatures[:, None]
    with torch.no_grad():
        # Any shift gives the same log-softmax; the maximum keeps exp() in range.
        shift = scaled.amax(dim=-1)
        if group is not None:
            dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    shifted = scaled - shift[:, None]
    log_normaliser = _sum_over_ranks(shifted.exp().sum(dim=-1), group).log()
    local_targets = targets - first_row
    held_here = (local_targets >= 0) & (local_targets < shifted.shape[-1])
    picked = shifted.gather(-1, local_targets.clamp(0, shifted.shape[-1] - 1)[:, None]).squeeze(-1)
    target_logit = _sum_over_ranks(torch.where(held_here, picked, 0.0), group)
    return target_logit - log_normaliser


def _sum_over_ranks(partial: Tensor, group: ProcessGroup | None) -> Tensor:
    return partial if group is None else _SumOverRanks.apply(partial, group)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) of per-rank partial sums, whose gradient passes through unchanged.

    Every rank computes the same loss from the total, so the gradient of the total is the same on
    every rank, and it is also the gradient of this rank's own partial sum: nothing to reduce.
    """

    @staticmethod
    def forward(ctx, partial: Tensor, group: ProcessGroup) -> Tensor:
        total = partial.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class PolicyLogprobs(nn.Module):
    """A Hugging Face causal LM whose forward returns token logprobs instead of logits.

    It takes the causal LM's transformer body (`model`) and output head (`lm_head`) as its own
    children, under the same names, so its parameters and state dict are the causal LM's, named as
    Hugging Face and vLLM name them. It is the module that FSDP2 shards at the root: the embedding,
    the final norm and the head are gathered around its forward, which is where the chunked head runs.
    """

    def __init__(self, causal_lm: PreTrainedModel, chunk_size: int):
        super().__init__()
        _check_plain_linear_head(causal_lm)
        self.model = causal_lm.model
        self.lm_head = causal_lm.lm_head
        self.config = causal_lm.config
        self.chunk_size = chunk_size

    def forward(self, input_ids: Tensor, attention_mask: Tensor, temperatures: Tensor,
                shared_prompts: SharedPromptRows | None = None) -> Tensor:
        """[batch, seq - 1]: the logprob of each token after the first, at its position's temperature.
        With `shared_prompts` the transformer body runs on those rows instead of the right-padded
        `input_ids` (rl/trainer/shared_prompts.py); the logprobs are the same."""
        if shared_prompts is None:
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
        else:
            rows = self.model(
                input_ids=shared_prompts.input_ids, position_ids=shared_prompts.position_ids,
                attention_mask=shared_prompts.attention_mask(self.config._attn_implementation),
            ).last_hidden_state
            hidden = rows.flatten(0, 1)[shared_prompts.gather]
        logprobs = chunked_token_logprobs(hidden, self.lm_head.weight, input_ids[:, 1:], temperatures, self.chunk_size)
        # FSDP2 hooks the backward pass onto this output: not a view, which an in-place op could detach from it.
        return logprobs.clone()


def _check_plain_linear_head(causal_lm: PreTrainedModel) -> None:
    """The chunked head computes hidden @ W.T and nothing else: a model whose logits are more than that
    would train on logprobs that differ from the engines'."""
    head = getattr(causal_lm, "lm_head", None)
    if not hasattr(causal_lm, "model") or not isinstance(head, nn.Linear):
        problem = "it has no transformer body `model` with a linear output head `lm_head`"
    elif head.bias is not None:
        problem = "its output head has a bias"
    else:
        extras = [name for name in ("final_logit_softcapping", "logit_scale") if getattr(causal_lm.config, name, None)]
        problem = f"its logits are transformed after the head (config.{extras[0]})" if extras else ""
    if problem:
        raise ConfigError(f"model.path: the trainer cannot compute the logprobs of {type(causal_lm).__name__}: {problem}")
