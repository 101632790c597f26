"""Samples that share a prompt, trained with the prompt computed once.

The samples of a group start with the same prompt. Trained as rows of their own, each computes that
prompt's forward and backward again. Here a micro-batch's samples of one prompt are packed into one
row: the prompt once, then each sample's continuation, up to `trainer.shared_prompt_row_tokens`
tokens per row (a group that does not fit goes on in another row, which repeats the prompt). A 4-D
attention mask lets every continuation attend to the prompt and to itself, never to another
continuation, and its position ids go on from the prompt's end, so each continuation's hidden states
are those of its own sequence. The rows' hidden states are then gathered back into the samples'
layout, [batch, seq - 1], which is what the output head and the loss read: gradients flowing into a
shared prompt position add up over the samples that read it, as they would over the separate rows.

The mask is dense, [rows, width, width]; rows are bounded by the setting above so that it stays
small. Attention kernels that take no such mask (flash attention) and sliding-window layers (whose
window the mask would replace) train every sample as its own row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import PretrainedConfig

from rl.records import TrainSample
from rl.trainer.qk_clip import ATTENTION_IMPLEMENTATION as QK_CLIP_ATTENTION

# Attention implementations that take a 4-D mask as given; "sdpa" takes it as booleans, the others
# (eager math, and QK-Clip's recording attention) add it to the logits.
_BOOLEAN_MASK = "sdpa"
_ADDITIVE_MASK = ("eager", QK_CLIP_ATTENTION)
# Segment ids in a packed row.
_PROMPT, _PADDING = -1, -2


@dataclass
class SharedPromptRows:
    """A micro-batch's samples packed into rows that hold each prompt once."""

    input_ids: Tensor  # [rows, width]
    position_ids: Tensor  # [rows, width]
    allowed: Tensor  # [rows, width, width] bool: query position (dim 1) may attend to key position (dim 2)
    # [batch, seq - 1]: for each logprob position of each sample, the flat index into the rows'
    # positions ([rows * width]) whose hidden state predicts that sample's next token there.
    gather: Tensor

    def to(self, device: torch.device) -> SharedPromptRows:
        return SharedPromptRows(*(t.to(device) for t in (self.input_ids, self.position_ids, self.allowed, self.gather)))

    def attention_mask(self, attention_implementation: str) -> Tensor:
        """The [rows, 1, width, width] mask in the form `attention_implementation` reads."""
        allowed = self.allowed[:, None]
        if attention_implementation == _BOOLEAN_MASK:
            return allowed
        return torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, torch.finfo(torch.float32).min)


def can_share_prompts(config: PretrainedConfig) -> bool:
    """Whether a model of `config` can train on packed rows (its attention takes the 4-D mask as is)."""
    attention = config._attn_implementation
    full_attention = all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or ["full_attention"])
    return (attention == _BOOLEAN_MASK or attention in _ADDITIVE_MASK) and full_attention


def _prompt(sample: TrainSample) -> tuple[int, ...]:
    return tuple(sample.token_ids[: sample.prompt_len])


def prompt_groups(samples: list[TrainSample]) -> list[list[TrainSample]]:
    """The samples grouped by prompt, groups in the order of their first sample."""
    by_prompt: dict[tuple[int, ...], list[TrainSample]] = {}
    for sample in samples:
        by_prompt.setdefault(_prompt(sample), []).append(sample)
    return list(by_prompt.values())


def pack(samples: list[TrainSample], row_tokens: int) -> SharedPromptRows | None:
    """`samples` in rows of at most `row_tokens` tokens that hold each prompt once (a sample longer
    than that takes a row of its own), or None when no row would hold two samples."""
    rows: list[list[int]] = []
    row_lengths: list[int] = []
    open_row: dict[tuple[int, ...], int] = {}
    for index, sample in enumerate(samples):
        prompt = _prompt(sample)
        continuation = len(sample.token_ids) - sample.prompt_len
        row = open_row.get(prompt)
        if row is not None and row_lengths[row] + continuation <= row_tokens:
            rows[row].append(index)
            row_lengths[row] += continuation
        else:
            open_row[prompt] = len(rows)
            rows.append([index])
            row_lengths.append(len(sample.token_ids))
    if len(rows) == len(samples):
        return None

    width, seq = max(row_lengths), max(len(s.token_ids) for s in samples)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    position_ids = torch.zeros(len(rows), width, dtype=torch.long)
    segments = torch.full((len(rows), width), _PADDING, dtype=torch.long)
    gather = torch.zeros(len(samples), seq - 1, dtype=torch.long)
    for row, members in enumerate(rows):
        prompt_len = samples[members[0]].prompt_len
        input_ids[row, :prompt_len] = torch.tensor(samples[members[0]].token_ids[:prompt_len])
        position_ids[row, :prompt_len] = torch.arange(prompt_len)
        segments[row, :prompt_len] = _PROMPT
        start = prompt_len
        for segment, index in enumerate(members):
            token_ids = samples[index].token_ids
            end = start + len(token_ids) - prompt_len
            input_ids[row, start:end] = torch.tensor(token_ids[prompt_len:])
            position_ids[row, start:end] = torch.arange(prompt_len, len(token_ids))
            segments[row, start:end] = segment
            # Position t of the sample (t + 1's predictor) is t within the prompt, start + (t - prompt_len) after it.
            t = torch.arange(len(token_ids) - 1)
            gather[index, : len(t)] = row * width + torch.where(t < prompt_len, t, start + t - prompt_len)
            start = end
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    query, key = segments[:, :, None], segments[:, None, :]
    # Padding attends to the prompt alone: every query keeps a key, so no softmax row is empty, and
    # a query that cannot attend to itself is padding to QK-Clip's record of the largest logits.
    allowed = causal & ((key == _PROMPT) | ((key == query) & (query != _PADDING)))
    return SharedPromptRows(input_ids, position_ids, allowed, gather)
