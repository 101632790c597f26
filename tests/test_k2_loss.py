import math

import torch

from rl.trainer.logprobs import token_logprobs
from rl.trainer.losses import group_advantages, k2_policy_loss


def test_group_advantages_subtract_each_prompts_mean():
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    groups = ["a", "a", "a", "a", "b", "b"]
    assert group_advantages(rewards, groups) == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0]


def test_k2_loss_hand_computed():
    # (r - rbar - tau * (logp - logp_old))^2 with tau = 0.5:
    #   sample 0: 0.5 - 0.5 * (-1.0 - -1.2) = 0.4   -> 0.16
    #   sample 1: -0.5 - 0.5 * (-2.0 - -1.0) = 0.0 -> 0.0
    #   sample 2: 0.0 - 0.5 * (-3.0 - -3.0) = 0.0  -> 0.0
    #   sample 3: -1.0 - 0.5 * (0.4) = -1.2        -> 1.44
    logp = torch.tensor([-1.0, -2.0, -3.0, -0.6])
    logp_old = torch.tensor([-1.2, -1.0, -3.0, -1.0])
    advantages = torch.tensor([0.5, -0.5, 0.0, -1.0])
    loss = k2_policy_loss(logp, logp_old, advantages, tau=0.5)
    assert torch.allclose(loss, torch.tensor([0.16, 0.0, 0.0, 1.44]))


def test_k2_loss_gradient_is_policy_gradient_at_pi_old():
    # At theta = theta_old the gradient w.r.t. log pi is -2 * tau * advantage.
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    k2_policy_loss(logp, logp.detach(), torch.tensor([1.0, -0.5]), tau=0.1).sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([-0.2, 0.1]))


def test_token_logprobs_match_manual_softmax_with_temperature():
    logits = torch.tensor([[[1.0, 2.0, 0.0], [0.5, 0.5, 3.0], [0.0, 0.0, 0.0]]])
    ids = torch.tensor([[0, 1, 2]])
    got = token_logprobs(logits, ids, 2.0)
    per_position = token_logprobs(logits, ids, torch.tensor([[2.0, 2.0]]))
    assert torch.equal(got, per_position)
    first = 2.0 / 2 - math.log(math.exp(0.5) + math.exp(1.0) + math.exp(0.0))
    second = 3.0 / 2 - math.log(2 * math.exp(0.25) + math.exp(1.5))
    assert torch.allclose(got, torch.tensor([[first, second]]))
