"""The trainer in-process, as a one-rank gloo group: gradient accumulation and the update itself."""

import dataclasses
import random
import socket

import torch

from rl.config import TrainerConfig
from rl.records import Task, Trajectory
from rl.trainer import TrainerWorker

TASK = Task("t", ({"role": "user", "content": "x"},), "arithmetic", "math", {"answer": "1"})


def _trajectories(count: int, vocab: int) -> list[Trajectory]:
    rng = random.Random(0)
    out = []
    for _ in range(count):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(4, 9))]
        response = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 7))]
        out.append(
            Trajectory(TASK, prompt, response, [-1.0] * len(response), [1] * len(response), 0, "stop", "")
        )
    return out


def _train_once(policy, micro_batch_size: int, steps: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    config = dataclasses.replace(TrainerConfig(), micro_batch_size=micro_batch_size, optimizer_steps_per_batch=steps)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    worker = TrainerWorker(0, 1, port, str(policy), "float32", config, seed=0)
    try:
        trajectories = _trajectories(8, worker.model.config.vocab_size)
        advantages = [0.5, -0.5, 1.0, -1.0, 0.25, -0.25, 0.0, 0.0]
        metrics = worker.train(trajectories, advantages, temperature=1.0)
        assert metrics["loss"] > 0 and metrics["response_tokens"] == sum(len(t.response_ids) for t in trajectories)
        # After the step, .grad still holds the step's (clipped) accumulated gradient.
        state = {name: p.detach().clone() for name, p in worker.model.named_parameters()}
        state |= {f"{name}.grad": p.grad.clone() for name, p in worker.model.named_parameters() if p.grad is not None}
        return state, metrics
    finally:
        worker.shutdown()


def test_micro_batches_accumulate_to_the_full_batch_update(tiny_policy):
    whole, _ = _train_once(tiny_policy, micro_batch_size=8, steps=1)
    accumulated, _ = _train_once(tiny_policy, micro_batch_size=3, steps=1)
    assert whole.keys() == accumulated.keys()
    for name in whole:
        # Gradients agree to float32 rounding; Muon orthogonalises in bfloat16, so
        # the updated weights agree to about that precision.
        tolerance = 1e-6 if name.endswith(".grad") else 1e-4
        assert torch.allclose(whole[name], accumulated[name], atol=tolerance), name


def test_update_moves_weights_and_second_step_sees_the_log_ratio(tiny_policy):
    from transformers import AutoModelForCausalLM

    before = dict(AutoModelForCausalLM.from_pretrained(tiny_policy).named_parameters())
    after, metrics = _train_once(tiny_policy, micro_batch_size=4, steps=2)
    moved = [name for name in before if not torch.equal(after[name], before[name].detach())]
    assert "model.layers.0.self_attn.q_proj.weight" in moved and "lm_head.weight" in moved
    # The second optimizer step trains against pi_old, no longer equal to pi_theta.
    assert metrics["log_ratio_abs_mean"] > 0
