"""The trainer in-process, as a one-rank gloo group: gradient accumulation and the update itself."""

import pytest
import torch
from processes import free_port
from trainer_helpers import full_parameters_and_grads, samples, start_worker

from rl.config import TrainerConfig
from rl.trainer.worker import MicroBatch


def _train_once(policy, micro_batch_size: int, steps: int, reverse: bool = False,
                shared_prompt_row_tokens: int = 1024) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    config = TrainerConfig(data_parallel_size=1, micro_batch_size=micro_batch_size, optimizer_steps_per_batch=steps,
                           shared_prompt_row_tokens=shared_prompt_row_tokens)
    worker = start_worker(0, 1, free_port(), str(policy), config)
    try:
        batch = samples(8, worker.model.config.vocab_size)
        if reverse:
            batch.reverse()
        metrics = worker.train(batch, policy_version=0)
        loss, _ = metrics["loss"]
        assert loss > 0 and metrics["logprob_diff_mean"][1] == sum(len(s.loss_mask) for s in batch)
        # After the step, .grad still holds the step's (clipped) accumulated gradient.
        return full_parameters_and_grads(worker.model), metrics
    finally:
        worker.shutdown()


def _assert_same_update(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert expected.keys() == actual.keys()
    for name in expected:
        # Gradients agree to float32 rounding; Muon orthogonalises in bfloat16, so
        # the updated weights agree to about that precision.
        tolerance = 1e-6 if name.endswith(".grad") else 1e-4
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=tolerance, msg=name)


def test_micro_batches_accumulate_to_the_full_batch_update(tiny_policy):
    whole, _ = _train_once(tiny_policy, micro_batch_size=8, steps=1)
    accumulated, _ = _train_once(tiny_policy, micro_batch_size=3, steps=1)
    _assert_same_update(whole, accumulated)


@pytest.mark.parametrize("shared_prompt_row_tokens", [1024, 0])
def test_micro_batches_hold_a_prompts_samples_or_samples_of_similar_length_and_the_order_changes_nothing(
        tiny_policy, shared_prompt_row_tokens):
    config = TrainerConfig(data_parallel_size=1, micro_batch_size=3, shared_prompt_row_tokens=shared_prompt_row_tokens)
    worker = start_worker(0, 1, free_port(), str(tiny_policy), config)
    try:
        batch = samples(8, worker.model.config.vocab_size)
        micro_batches = worker._mini_batches(batch, steps=1)[0]
    finally:
        worker.shutdown()
    if shared_prompt_row_tokens:
        # The four pairs that share a prompt, shortest pair first, each pair in one row where a micro-batch holds it.
        pairs = sorted((batch[i : i + 2] for i in range(0, 8, 2)), key=lambda pair: sum(len(s.token_ids) for s in pair))
        ordered = [sample for pair in pairs for sample in pair]
        assert [micro.input_ids.tolist() for micro in micro_batches] == [
            MicroBatch.of(ordered[start : start + 3], torch.device("cpu")).input_ids.tolist() for start in range(0, 8, 3)
        ]
        assert [micro.shared_prompts.input_ids.shape[0] for micro in micro_batches] == [2, 2, 1]
    else:
        lengths = sorted(len(sample.token_ids) for sample in batch)
        assert [micro.input_ids.shape for micro in micro_batches] == [
            (len(lengths[start : start + 3]), max(lengths[start : start + 3])) for start in range(0, 8, 3)
        ]
        assert all(micro.shared_prompts is None for micro in micro_batches)
    forward, _ = _train_once(tiny_policy, micro_batch_size=3, steps=1, shared_prompt_row_tokens=shared_prompt_row_tokens)
    reversed_, _ = _train_once(tiny_policy, micro_batch_size=3, steps=1, reverse=True, shared_prompt_row_tokens=shared_prompt_row_tokens)
    _assert_same_update(forward, reversed_)


@pytest.mark.parametrize("steps", [1, 2])
def test_rows_that_hold_a_prompt_once_give_the_update_of_one_row_per_sample(tiny_policy, steps):
    shared, _ = _train_once(tiny_policy, micro_batch_size=4, steps=steps)
    separate, _ = _train_once(tiny_policy, micro_batch_size=4, steps=steps, shared_prompt_row_tokens=0)
    _assert_same_update(separate, shared)


def test_update_moves_weights_and_second_step_sees_the_log_ratio(tiny_policy):
    from transformers import AutoModelForCausalLM

    before = dict(AutoModelForCausalLM.from_pretrained(tiny_policy).named_parameters())
    after, metrics = _train_once(tiny_policy, micro_batch_size=4, steps=2)
    moved = [name for name in before if not torch.equal(after[name], before[name].detach())]
    assert "model.layers.0.self_attn.q_proj.weight" in moved and "lm_head.weight" in moved
    # The second optimizer step trains against pi_old, no longer equal to pi_theta.
    total, count = metrics["log_ratio_abs_mean"]
    assert total / count > 0


def test_offloading_between_steps_changes_nothing(tiny_policy):
    """Colocated on GPU the trainer offloads around each update; here host and device are one, so
    this checks that the moves keep FSDP2's shards, the optimizer's references and its state."""

    def two_steps(offload: bool) -> dict[str, torch.Tensor]:
        config = TrainerConfig(data_parallel_size=1, micro_batch_size=4)
        worker = start_worker(0, 1, free_port(), str(tiny_policy), config)
        try:
            batch = samples(8, worker.model.config.vocab_size)
            for _ in range(2):
                worker.train(batch, policy_version=0)
                if offload:
                    worker.offload(parameters=False)  # before an update
                    assert worker.offloaded == {"optimizer"}
                    worker.offload()  # after it
                    assert worker.offloaded == {"optimizer", "parameters"}
            worker.sequence_logprobs(batch[0].token_ids[: batch[0].prompt_len])  # takes back the parameters alone
            assert worker.offloaded == ({"optimizer"} if offload else set())
            return full_parameters_and_grads(worker.model)
        finally:
            worker.shutdown()

    plain, offloaded = two_steps(offload=False), two_steps(offload=True)
    for name, value in plain.items():
        if not name.endswith(".grad"):  # offloading drops the last step's gradients
            assert torch.equal(value, offloaded[name]), name


def test_pi_old_from_the_training_forward_equals_a_separate_pass(tiny_policy):
    """With one optimizer step per batch, pi_old is the policy being trained: the logprobs of the
    training forward (detached) give the same loss and gradients as a separate no-grad pass."""

    def one_step(separate_pass: bool) -> tuple[dict[str, torch.Tensor], float]:
        config = TrainerConfig(data_parallel_size=1, micro_batch_size=4)
        worker = start_worker(0, 1, free_port(), str(tiny_policy), config)
        try:
            batch = samples(8, worker.model.config.vocab_size)
            mini_batch = [worker._micro_batch(batch[:4]), worker._micro_batch(batch[4:])]
            old = None
            if separate_pass:
                with torch.no_grad():
                    old = [worker._token_logprobs(micro) for micro in mini_batch]
            metrics = worker.train_step(mini_batch, old, policy_version=0)
            return full_parameters_and_grads(worker.model), metrics["loss"].total
        finally:
            worker.shutdown()

    (shortcut, shortcut_loss), (separate, separate_loss) = one_step(False), one_step(True)
    assert shortcut_loss == pytest.approx(separate_loss, rel=1e-6)
    for name, value in separate.items():
        torch.testing.assert_close(shortcut[name], value, rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("loss", ["k2", "grpo"])
def test_leaving_out_zero_advantage_samples_gives_the_same_update(tiny_policy, loss):
    """With one optimizer step per batch a sample with advantage 0 has no gradient: the batch
    without it, its units added to the denominator, takes the same step."""
    from rl.trainer.losses import LossSettings, get_loss

    def one_step(leave_out: bool) -> dict[str, torch.Tensor]:
        config = TrainerConfig(data_parallel_size=1, micro_batch_size=4, loss=loss)
        worker = start_worker(0, 1, free_port(), str(tiny_policy), config)
        try:
            batch, skipped_units = samples(8, worker.model.config.vocab_size), 0.0
            if leave_out:
                batch, skipped_units = get_loss(loss)(LossSettings()).without_zero_gradients(batch)
                assert len(batch) == 6 and skipped_units > 0
            worker.train(batch, policy_version=0, skipped_units=skipped_units)
            return full_parameters_and_grads(worker.model)
        finally:
            worker.shutdown()

    whole, left_out = one_step(False), one_step(True)
    _assert_same_update(whole, left_out)


def test_the_step_learning_rate_reaches_both_optimizers(tiny_policy):
    """`trainer.lr` may be a schedule: the driver sends each step's rate; 0 leaves every weight as it was."""
    from transformers import AutoModelForCausalLM

    before = dict(AutoModelForCausalLM.from_pretrained(tiny_policy).named_parameters())
    config = TrainerConfig(data_parallel_size=1, micro_batch_size=8, optimizer="muon")
    worker = start_worker(0, 1, free_port(), str(tiny_policy), config)
    try:
        assert len(worker.optimizer.optimizers) == 2  # AdamW and Muon
        worker.train(samples(8, worker.model.config.vocab_size), policy_version=0, lr=0.0)
        after = full_parameters_and_grads(worker.model)
        assert {group["lr"] for optimizer in worker.optimizer.optimizers for group in optimizer.param_groups} == {0.0}
    finally:
        worker.shutdown()
    for name, value in before.items():
        assert torch.equal(after[name], value.detach()), name


@pytest.mark.parametrize("strategy", ["fsdp", "replicate"])
def test_reset_after_a_no_grad_forward_restores_the_starting_weights(tiny_policy, strategy):
    """A no-grad forward (the logprobs a test or a caller asks for) leaves no parameter gathered for
    the next run's `reset` to trip over."""
    config = TrainerConfig(data_parallel_size=1, micro_batch_size=4)
    worker = start_worker(0, 1, free_port(), str(tiny_policy), config, strategy=strategy)
    try:
        batch = samples(8, worker.model.config.vocab_size)
        before = worker.sequence_logprobs(batch[0].token_ids)
        worker.train(batch, policy_version=0, lr=1e-3)
        assert worker.sequence_logprobs(batch[0].token_ids) != before
        worker.reset(seed=0)
        assert worker.sequence_logprobs(batch[0].token_ids) == pytest.approx(before, abs=1e-6)
    finally:
        worker.shutdown()
