"""The sharded trainer on two gloo ranks takes the same step as one unsharded rank, and bad layouts fail clearly."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from processes import free_port
from trainer_helpers import full_parameters_and_grads, run_two_ranks, samples, start_worker
from transformers import AutoConfig, AutoModelForCausalLM

from rl.cluster.trainer_group import merge_rank_metrics
from rl.config import TrainerConfig
from rl.trainer.optim import MuonWithAdamW
from rl.trainer.parallel import check_layout, data_parallel_strategy
from rl.trainer.worker import TrainerWorker

# Below most heads' largest logit in the tiny policy: the step also exercises QK-Clip
# on heads that are split over the tensor-parallel ranks.
QK_CLIP_THRESHOLD = 0.2


def _config(data_parallel_size: int, tensor_parallel_size: int) -> TrainerConfig:
    return TrainerConfig(
        data_parallel_size=data_parallel_size,
        tensor_parallel_size=tensor_parallel_size,
        micro_batch_size=2,
        qk_clip_threshold=QK_CLIP_THRESHOLD,
        # Muon's sharded matrices are what this tests, whatever the default optimizer.
        optimizer="muon",
        lr=5e-4,
    )


def _train_one_step(rank: int, world_size: int, port: int, policy: Path, data_parallel_size: int, out: Path,
                    strategy: str = "fsdp") -> None:
    """One optimizer step on this rank's data-parallel shard of the batch; saves full weights, gradients, metrics."""
    tensor_parallel_size = world_size // data_parallel_size
    config = _config(data_parallel_size, tensor_parallel_size)
    worker = start_worker(rank, world_size, port, str(policy), config, strategy=strategy)
    try:
        batch = samples(8, worker.model.config.vocab_size)
        shard = len(batch) // data_parallel_size
        lo = rank // tensor_parallel_size * shard
        metrics = worker.train(batch[lo : lo + shard], policy_version=0)
        logprobs = worker.sequence_logprobs(batch[0].token_ids)
        worker.save_model(str(out / "saved"))
        result = {"state": full_parameters_and_grads(worker.model), "metrics": metrics, "logprobs": logprobs}
        torch.save(result, out / f"rank{rank}.pt")
    finally:
        worker.shutdown()


def _unsharded_update(policy: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights a plain, unsharded MuonWithAdamW step makes from the (clipped) gradients in `state`."""
    model = AutoModelForCausalLM.from_pretrained(policy)
    for name, param in model.named_parameters():
        param.grad = state[f"{name}.grad"]
    # With the ranks' one thread: on CPUs with bfloat16 matrix instructions (AMX, AVX512-BF16),
    # Newton-Schulz's bfloat16 products round differently when split over more threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        MuonWithAdamW(model, _config(1, 1)).step()
    finally:
        torch.set_num_threads(threads)
    return {name: param.detach() for name, param in model.named_parameters()}


@pytest.mark.parametrize(
    ("data_parallel_size", "strategy"), [(1, "fsdp"), (2, "fsdp"), (2, "replicate")], ids=["tp2", "dp2", "dp2-replicate"]
)
def test_sharded_step_equals_the_unsharded_step(tiny_policy, tmp_path, data_parallel_size, strategy):
    """FSDP2, the replicated strategy and tensor parallelism all take the unsharded step."""
    (tmp_path / "sharded").mkdir()
    (tmp_path / "whole").mkdir()
    run_two_ranks(_train_one_step, tiny_policy, data_parallel_size, tmp_path / "sharded", strategy)
    _train_one_step(0, 1, free_port(), tiny_policy, 1, tmp_path / "whole")
    ranks = [torch.load(tmp_path / "sharded" / f"rank{rank}.pt") for rank in range(2)]
    whole = torch.load(tmp_path / "whole" / "rank0.pt")

    # Each data-parallel rank reports the mean loss of its shard; tensor-parallel ranks the same.
    sharded = merge_rank_metrics([r["metrics"] for r in ranks], tensor_parallel_size=2 // data_parallel_size)
    unsharded = merge_rank_metrics([whole["metrics"]], tensor_parallel_size=1)
    for key in ("loss", "grad_norm", "max_attention_logit", "logprob_diff_mean"):
        assert sharded[key] == pytest.approx(unsharded[key], rel=1e-5), key
    assert unsharded["max_attention_logit"] > QK_CLIP_THRESHOLD
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded" / "saved").state_dict()
    for name, value in saved.items():
        assert torch.equal(value, ranks[0]["state"][name]), name
    for rank in ranks:
        state = rank["state"]
        assert state.keys() == whole["state"].keys()
        torch.testing.assert_close(rank["logprobs"], whole["logprobs"], rtol=0, atol=1e-4)
        # Sharding changes the float32 summation order of the gradients, nothing more.
        for name in state:
            if name.endswith(".grad"):
                torch.testing.assert_close(state[name], whole["state"][name], rtol=0, atol=1e-6, msg=name)
        # The sharded optimizers take exactly the unsharded step on the same whole gradients
        # (q_proj and k_proj are then also rescaled by QK-Clip).
        for name, expected in _unsharded_update(tiny_policy, state).items():
            if "q_proj" not in name and "k_proj" not in name:
                assert torch.equal(state[name], expected), name
        # Across the two runs the weights agree less closely than the gradients: Newton-Schulz in
        # bfloat16 has an error of about 0.05 per entry of its output, and an input one float32
        # ulp away can round to a neighbouring bfloat16 and land elsewhere within that error.
        # The step scales it by lr * 0.2 * sqrt(512) for the largest matrices.
        atol = 0.1 * _config(1, 1).lr * 0.2 * 512**0.5
        for name in state:
            if not name.endswith(".grad"):
                torch.testing.assert_close(state[name], whole["state"][name], rtol=0, atol=atol, msg=name)


def test_layout_must_match_the_ranks(tiny_policy):
    config = TrainerConfig(data_parallel_size=1, tensor_parallel_size=2)
    message = r"data_parallel_size x trainer\.tensor_parallel_size = 1 x 2 = 2 does not match the 1 trainer ranks"
    with pytest.raises(ValueError, match=message):
        TrainerWorker(0, 1, str(tiny_policy), "float32", config, seed=0)
    assert not dist.is_initialized()


def test_the_data_parallel_strategy_follows_the_memory():
    gib = 2**30
    assert data_parallel_strategy("auto", parameters=1_000_000, device_bytes=8 * gib) == "replicate"
    assert data_parallel_strategy("auto", parameters=1_000_000_000, device_bytes=40 * gib) == "fsdp"
    assert data_parallel_strategy("fsdp", parameters=1_000, device_bytes=8 * gib) == "fsdp"
    with pytest.raises(ValueError, match=r"trainer\.data_parallel_strategy=replicate: .* need 14\.9 GiB on every rank, more than a rank's 8\.0 GiB"):
        data_parallel_strategy("replicate", parameters=1_000_000_000, device_bytes=8 * gib)


def test_tensor_parallel_size_must_divide_the_model(tiny_policy):
    model_config = AutoConfig.from_pretrained(tiny_policy)
    heads = r"trainer\.tensor_parallel_size=3 does not divide the model's num_attention_heads=2"
    with pytest.raises(ValueError, match=heads):
        check_layout(TrainerConfig(data_parallel_size=1, tensor_parallel_size=3), 3, model_config)
    # An odd vocabulary is fine: the embedding and the head take uneven shards.
    check_layout(TrainerConfig(data_parallel_size=1, tensor_parallel_size=2), 2, model_config)


@pytest.mark.parametrize("strategy", ["fsdp", "replicate"])
def test_a_bfloat16_trainer_divides_the_logits_by_the_exact_sampling_temperature(tiny_policy, monkeypatch, strategy):
    """Mixed precision casts a module's float inputs to the compute dtype; the temperatures must
    reach the output head as sampled (0.7, not bfloat16's 0.69921875), or the trainer's logprobs
    leave the engines'."""
    import rl.trainer.logprobs as logprobs

    seen = []
    exact = logprobs.chunked_token_logprobs

    def recording(hidden, head_weight, targets, temperatures, chunk_size):
        seen.append(temperatures.detach().clone())
        return exact(hidden, head_weight, targets, temperatures, chunk_size)

    monkeypatch.setattr(logprobs, "chunked_token_logprobs", recording)
    worker = start_worker(0, 1, free_port(), tiny_policy, _config(1, 1), dtype="bfloat16", strategy=strategy)
    try:
        batch = samples(2, worker.model.config.vocab_size)
        for sample in batch:
            sample.temperatures = [0.7] * len(sample.temperatures)
        worker.train(batch, policy_version=0)
    finally:
        worker.shutdown()
    assert seen and all(t.dtype == torch.float32 for t in seen)
    assert all(torch.isclose(t[t != 1.0], torch.tensor(0.7)).all() for t in seen)


@pytest.mark.parametrize(("count", "data_parallel_size", "steps", "real"), [
    (9, 2, 4, [[2, 1, 1, 1], [1, 1, 1, 1]]),
    (253, 2, 1, [[127], [126]]),
    (13, 4, 1, [[4], [3], [3], [3]]),
    (1, 2, 2, [[1, 0], [0, 0]]),
])
def test_the_batch_is_shared_evenly_over_ranks_and_optimizer_steps(count, data_parallel_size, steps, real):
    """Masked copies pad every mini-batch to one size: no step trains on padding alone while
    another has samples to spare."""
    from rl.cluster.trainer_group import shard_batch

    shards = shard_batch(samples(count, 64), data_parallel_size, steps)
    assert len({len(shard) for shard in shards}) == 1
    size = len(shards[0]) // steps
    assert [[sum(any(s.loss_mask) for s in shard[k * size : (k + 1) * size]) for k in range(steps)] for shard in shards] == real
