"""Samples that share a prompt, trained in rows that hold it once: the same logprobs and gradients as
one row per sample (and, under QK-Clip, the same largest attention logits), for each attention
implementation that takes the mask."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from rl.records import TrainSample
from rl.trainer.logprobs import PolicyLogprobs
from rl.trainer.qk_clip import MAX_LOGITS_ATTRIBUTE as QK_CLIP_RECORD
from rl.trainer.qk_clip import ATTENTION_IMPLEMENTATION as QK_CLIP_ATTENTION
from rl.trainer.shared_prompts import can_share_prompts, pack, prompt_groups
from rl.trainer.worker import MicroBatch

VOCAB = 97


def _policy(attention: str) -> PolicyLogprobs:
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, max_position_embeddings=128, attn_implementation=attention)
    return PolicyLogprobs(Qwen2ForCausalLM(config), chunk_size=16)


def _sample(prompt: list[int], continuation: list[int], advantage: float) -> TrainSample:
    n = len(continuation)
    return TrainSample(prompt + continuation, len(prompt), [1] * n, [0.0] * n, [0.8] * n, [0] * n, advantage)


def _samples() -> list[TrainSample]:
    """Two prompts of different lengths, their samples interleaved and of different lengths, and a
    sample whose prompt no other shares."""
    generator = torch.Generator().manual_seed(1)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, VOCAB, (n,), generator=generator).tolist()

    first, second, alone = tokens(7), tokens(4), tokens(5)
    lengths = [(first, 6), (second, 9), (first, 3), (second, 1), (first, 8), (alone, 4), (second, 5)]
    return [_sample(prompt, tokens(n), advantage=0.3 * index - 1) for index, (prompt, n) in enumerate(lengths)]


def _logprobs_and_gradients(policy: PolicyLogprobs, batch: MicroBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The logprobs of the trained tokens, the parameters' gradients, and (QK-Clip's attention) the
    largest attention logit it recorded for each layer's heads."""
    policy.zero_grad()
    for layer in policy.model.layers:
        layer.self_attn.__dict__.pop(QK_CLIP_RECORD, None)
    logprobs = policy(batch.input_ids, batch.attention, batch.temperatures, batch.shared_prompts)
    # A weight per token, so that every position's gradient counts differently.
    weights = torch.linspace(-1, 1, logprobs.numel()).view_as(logprobs) * batch.loss_mask
    (logprobs * weights).sum().backward()
    results = {name: p.grad.clone() for name, p in policy.named_parameters()}
    for index, layer in enumerate(policy.model.layers):
        if hasattr(layer.self_attn, QK_CLIP_RECORD):
            results[f"layer {index}: largest attention logits"] = getattr(layer.self_attn, QK_CLIP_RECORD)
    return logprobs.detach() * batch.loss_mask, results


@pytest.mark.parametrize("attention", ["sdpa", "eager", QK_CLIP_ATTENTION])
@pytest.mark.parametrize("row_tokens", [64, 20])
def test_shared_prompt_rows_give_the_logprobs_and_gradients_of_one_row_per_sample(attention, row_tokens):
    samples = _samples()
    policy = _policy(attention)
    assert can_share_prompts(policy.config)
    plain = MicroBatch.of(samples, torch.device("cpu"))
    shared = MicroBatch.of(samples, torch.device("cpu"), shared_prompt_row_tokens=row_tokens)
    assert plain.shared_prompts is None and shared.shared_prompts is not None
    rows = shared.shared_prompts.input_ids.shape[0]
    # 64 tokens hold each prompt's samples in one row; 20 split the first prompt's over two rows.
    assert rows == {64: 3, 20: 4}[row_tokens]
    expected_logprobs, expected_gradients = _logprobs_and_gradients(policy, plain)
    logprobs, gradients = _logprobs_and_gradients(policy, shared)
    torch.testing.assert_close(logprobs, expected_logprobs, rtol=1e-5, atol=1e-5)
    assert gradients.keys() == expected_gradients.keys()
    assert (attention == QK_CLIP_ATTENTION) == any("attention logits" in name for name in gradients)
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, expected_gradients[name], rtol=1e-4, atol=1e-5, msg=name)


def test_rows_hold_each_prompt_once_and_only_when_it_saves_a_row():
    samples = _samples()
    rows = pack(samples, row_tokens=64)
    prompt_tokens = sum(len(group[0].token_ids[: group[0].prompt_len]) for group in prompt_groups(samples))
    continuation_tokens = sum(len(s.token_ids) - s.prompt_len for s in samples)
    assert rows.position_ids.ne(0).sum() + rows.input_ids.shape[0] == prompt_tokens + continuation_tokens
    # No two samples share a prompt, or no row has room for a second: every sample its own row.
    assert pack([samples[0], samples[1], samples[5]], row_tokens=64) is None
    assert pack(samples, row_tokens=8) is None


def test_a_prompts_samples_are_grouped_in_the_order_of_their_first():
    samples = _samples()
    groups = prompt_groups(samples)
    assert [[samples.index(s) for s in group] for group in groups] == [[0, 2, 4], [1, 3, 6], [5]]


def test_attention_that_takes_no_mask_trains_each_sample_alone():
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         attn_implementation="sdpa", use_sliding_window=True, sliding_window=8, max_window_layers=0)
    assert not can_share_prompts(config)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    config._attn_implementation = "flash_attention_2"
    assert not can_share_prompts(config)
