"""Chunked and vocabulary-parallel logprobs: the same numbers and gradients as whole logits, in
memory that follows the chunk size."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.profiler import ProfilerActivity, profile
from trainer_helpers import run_two_ranks
from transformers import Gemma2Config, Gemma2ForCausalLM

from rl.config import ConfigError
from rl.trainer.logprobs import PolicyLogprobs, chunked_token_logprobs, token_logprobs


def _problem(batch: int, positions: int, hidden_size: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Final hidden states of `positions + 1` tokens, a head, the token ids, and a temperature per predicted token."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "hidden": torch.randn(batch, positions + 1, hidden_size, generator=generator),
        "weight": torch.randn(vocab, hidden_size, generator=generator) * 0.5,
        "input_ids": torch.randint(0, vocab, (batch, positions + 1), generator=generator),
        "temperatures": torch.rand(batch, positions, generator=generator) + 0.5,
        # A weight per logprob, so that every position's gradient counts differently.
        "loss_weights": torch.randn(batch, positions, generator=generator),
    }


def _whole_logits_reference(problem: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logprobs from the whole [batch, seq, vocabulary] logits, and the gradients of the hidden states and the head."""
    hidden = problem["hidden"].clone().requires_grad_()
    weight = problem["weight"].clone().requires_grad_()
    logprobs = token_logprobs(hidden @ weight.T, problem["input_ids"], problem["temperatures"])
    (logprobs * problem["loss_weights"]).sum().backward()
    return logprobs.detach(), hidden.grad, weight.grad


def _chunked(problem: dict[str, torch.Tensor], chunk_size: int, weight: torch.Tensor | None = None):
    """The same through `chunked_token_logprobs`, with the problem's head or `weight` (a sharded one)."""
    hidden = problem["hidden"].clone().requires_grad_()
    weight = (problem["weight"].clone() if weight is None else weight).requires_grad_()
    ids = problem["input_ids"]
    logprobs = chunked_token_logprobs(hidden[:, :-1], weight, ids[:, 1:], problem["temperatures"], chunk_size)
    (logprobs * problem["loss_weights"]).sum().backward()
    return logprobs.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_chunked_logprobs_and_gradients_equal_whole_logits(chunk_size):
    problem = _problem(batch=3, positions=21, hidden_size=16, vocab=503)
    expected = _whole_logits_reference(problem)
    for got, want, name in zip(_chunked(problem, chunk_size), expected, ("logprobs", "hidden grad", "head grad")):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def _vocabulary_parallel(rank: int, world_size: int, port: int, out: Path) -> None:
    """On each of two ranks: the head split by rows (an odd vocabulary: uneven shards), logprobs and gradients."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        problem = _problem(batch=2, positions=13, hidden_size=8, vocab=1001)
        mesh = init_device_mesh("cpu", (world_size,))
        weight = distribute_tensor(problem["weight"], mesh, [Shard(0)])
        logprobs, hidden_grad, weight_grad = _chunked(problem, chunk_size=5, weight=weight)
        result = {"logprobs": logprobs, "hidden_grad": hidden_grad, "weight_grad": weight_grad.full_tensor()}
        torch.save({**result, "local_rows": weight.to_local().shape[0]}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_vocabulary_parallel_logprobs_and_gradients_equal_whole_logits(tmp_path):
    run_two_ranks(_vocabulary_parallel, tmp_path)
    expected = _whole_logits_reference(_problem(batch=2, positions=13, hidden_size=8, vocab=1001))
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert [r["local_rows"] for r in ranks] == [501, 500]
    for rank in ranks:
        got = (rank["logprobs"], rank["hidden_grad"], rank["weight_grad"])
        for value, want, name in zip(got, expected, ("logprobs", "hidden grad", "head grad")):
            torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6, msg=name)


def _allocations(run) -> tuple[int, int]:
    """(peak bytes alive, largest single allocation) of the tensors `run` allocates, as the profiler records them."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    records = sorted((event.start_ns(), event.nbytes()) for event in prof.profiler.kineto_results.events() if event.name() == "[memory]")
    alive = peak = largest = 0
    for _, nbytes in records:
        alive += nbytes
        peak, largest = max(peak, alive), max(largest, nbytes)
    return peak, largest


def test_memory_follows_the_chunk_size_and_whole_logits_never_exist():
    """A Llama-3-sized vocabulary: forward and backward hold a few [chunk, vocabulary] tensors at a
    time, whatever the number of positions."""
    vocab, positions = 128_256, 512
    # A narrow head: its gradient stays smaller than a chunk of logits.
    problem = _problem(batch=1, positions=positions, hidden_size=8, vocab=vocab)

    def logits_bytes(rows: int) -> int:
        return rows * vocab * 4

    small, large = 16, 64
    small_peak, small_largest = _allocations(lambda: _chunked(problem, small))
    large_peak, large_largest = _allocations(lambda: _chunked(problem, large))
    whole_peak, whole_largest = _allocations(lambda: _whole_logits_reference(problem))
    assert whole_largest >= logits_bytes(positions)  # the measurement sees whole logits where they exist
    assert (small_largest, large_largest) == (logits_bytes(small), logits_bytes(large)), "one chunk's logits are the largest tensor"
    # The peak grows with the chunk, by a few chunk-sized tensors alive at once.
    chunk_tensors_alive = (large_peak - small_peak) / (logits_bytes(large) - logits_bytes(small))
    assert 1 <= chunk_tensors_alive <= 5, chunk_tensors_alive
    assert large_peak < whole_peak / 3


def test_a_model_whose_logits_are_more_than_the_head_is_refused():
    config = Gemma2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0,
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"cannot compute the logprobs of Gemma2ForCausalLM: .*final_logit_softcapping"):
        PolicyLogprobs(Gemma2ForCausalLM(config), chunk_size=8)
