"""QK-Clip in a one-rank trainer with lr=0: the recorded logits, and a rescale of the heads above the threshold only."""

from pathlib import Path

import pytest
import torch
from processes import free_port
from trainer_helpers import full_parameters_and_grads, samples, start_worker
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from rl.config import TrainerConfig
from rl.trainer.worker import TrainerWorker

BOOST = 30.0
THRESHOLD = 2.0


def _boost_query_heads(model, factors: dict[int, float]) -> None:
    """Multiply the query rows (weights and bias) of these heads of layer 0: their logits grow by the factor."""
    q_proj, head_dim = model.model.layers[0].self_attn.q_proj, model.config.head_dim
    with torch.no_grad():
        for head, factor in factors.items():
            rows = slice(head * head_dim, (head + 1) * head_dim)
            q_proj.weight[rows] *= factor
            q_proj.bias[rows] *= factor


@pytest.fixture(scope="module")
def boosted_policy(tiny_policy, tmp_path_factory) -> Path:
    """The tiny policy with its first attention head made sharp, far above THRESHOLD."""
    model = AutoModelForCausalLM.from_pretrained(tiny_policy)
    _boost_query_heads(model, {0: BOOST})
    path = tmp_path_factory.mktemp("boosted")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_policy).save_pretrained(path)
    return path


def _first_layer_max_logits(model, batch) -> torch.Tensor:
    """Per head, by hand: the largest causal q.k logit of layer 0 over the unpadded sequences."""
    attention, maxima = model.model.layers[0].self_attn, None
    with torch.no_grad():
        for sample in batch:
            ids = torch.tensor([sample.token_ids])
            length = ids.shape[1]
            hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
            cos, sin = model.model.rotary_emb(hidden, torch.arange(length)[None])
            q = attention.q_proj(hidden).view(1, length, -1, attention.head_dim).transpose(1, 2)
            k = attention.k_proj(hidden).view(1, length, -1, attention.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            logits = (q @ k.transpose(2, 3) * attention.scaling)[0]
            causal = torch.ones(length, length, dtype=torch.bool).tril()
            per_head = logits.masked_fill(~causal, float("-inf")).amax(dim=(1, 2))
            maxima = per_head if maxima is None else torch.maximum(maxima, per_head)
    return maxima


def _worker(policy: Path, threshold: float) -> TrainerWorker:
    config = TrainerConfig(data_parallel_size=1, lr=0.0, micro_batch_size=8, qk_clip_threshold=threshold)
    return start_worker(0, 1, free_port(), str(policy), config)


def _recorded_max_logits(worker: TrainerWorker, batch) -> torch.Tensor:
    worker.qk_clip.reset()
    with torch.no_grad():
        worker._token_logprobs(worker._micro_batch(batch))
    return worker.qk_clip.max_logits()


def test_qk_clip_rescales_only_the_head_above_the_threshold(boosted_policy):
    batch = samples(8, AutoModelForCausalLM.from_pretrained(boosted_policy).config.vocab_size)
    expected = _first_layer_max_logits(AutoModelForCausalLM.from_pretrained(boosted_policy), batch)
    assert expected[0] > THRESHOLD > expected[1]
    worker = _worker(boosted_policy, THRESHOLD)
    try:
        before = full_parameters_and_grads(worker.model)
        metrics = worker.train(batch, policy_version=0)
        # The padded training batch records what the unpadded sequences give by hand.
        assert metrics["max_attention_logit"] == pytest.approx(expected[0].item(), rel=1e-5)
        after = {name: value for name, value in full_parameters_and_grads(worker.model).items() if ".grad" not in name}
        # With lr=0 the optimizer changes nothing: only the clipped head's query and key rows moved.
        head = slice(0, worker.model.config.head_dim)
        root = (THRESHOLD / metrics["max_attention_logit"]) ** 0.5
        for name in after:
            if name.startswith("model.layers.0.self_attn.q_proj") or name.startswith("model.layers.0.self_attn.k_proj"):
                torch.testing.assert_close(after[name][head], before[name][head] * root, rtol=1e-6, atol=0)
                assert torch.equal(after[name][head.stop :], before[name][head.stop :]), name
            else:
                assert torch.equal(after[name], before[name]), name
        recorded = _recorded_max_logits(worker, batch)
        assert recorded[0, 0].item() == pytest.approx(THRESHOLD, rel=1e-5)
        assert recorded[0, 1].item() == pytest.approx(expected[1].item(), rel=1e-5)
    finally:
        worker.shutdown()


def test_grouped_query_heads_each_get_their_own_scale(tmp_path):
    """Two query heads share each key head: clipping one must leave its partner's logits as they were."""
    config = Qwen2Config(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, initializer_range=0.2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    # Head 0 shares its key head with head 1, which stays below the threshold; heads 2 and 3
    # share the other key head and are both clipped, by different factors.
    _boost_query_heads(model, {0: 20.0, 2: 10.0, 3: 40.0})
    model.save_pretrained(tmp_path)
    batch = samples(8, config.vocab_size)
    worker = _worker(tmp_path, threshold=1e9)
    try:
        before = _recorded_max_logits(worker, batch)[0]
        # Set once the maxima are known: below every boosted head.
        worker.qk_clip.threshold = threshold = before[[0, 2, 3]].min().item() / 2
        assert before[1] < threshold, "head 1 must stay below the threshold for this test to mean anything"
        worker.train(batch, policy_version=0)
        after = _recorded_max_logits(worker, batch)[0]
        torch.testing.assert_close(after, torch.clamp(before, max=threshold), rtol=1e-5, atol=0)
    finally:
        worker.shutdown()
