import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from trainer_helpers import run_two_ranks

from rl.trainer.losses import (
    GROUP_STD_EPS,
    K2Loss,
    LossSettings,
    MetricMean,
    PolicyLoss,
    TokenBatch,
    get_loss,
    loss_denominator,
    merge_metrics,
    register_loss,
    stale_tokens,
)


def batch(logprobs, old, mask, advantages, rollout=None, stale=None) -> TokenBatch:
    logprobs = torch.tensor(logprobs, requires_grad=True)
    old = torch.tensor(old)
    return TokenBatch(
        logprobs=logprobs,
        old_logprobs=old,
        rollout_logprobs=old.clone() if rollout is None else torch.tensor(rollout),
        loss_mask=torch.tensor(mask, dtype=torch.float),
        stale=torch.zeros_like(old, dtype=torch.bool) if stale is None else torch.tensor(stale, dtype=torch.bool),
        advantages=torch.tensor(advantages),
    )


def build(name: str, **settings) -> PolicyLoss:
    return get_loss(name)(LossSettings(**settings))


def test_registry_names_the_key_and_the_known_losses():
    assert get_loss("k2") is K2Loss
    with pytest.raises(ValueError, match=r"trainer\.loss: unknown loss 'dpo' \(known: grpo, k2, ppo-clip\)"):
        get_loss("dpo")
    with pytest.raises(ValueError, match="already registered"):
        register_loss("k2")(type("OtherK2", (K2Loss,), {}))


def test_bad_settings_name_their_key():
    with pytest.raises(ValueError, match=r"trainer\.clip_low must be in \(0, 1\)"):
        LossSettings(clip_low=1.5)
    with pytest.raises(ValueError, match=r"trainer\.tis_cap must be >= 1"):
        LossSettings(tis_cap=0.5)
    with pytest.raises(ValueError, match=r"trainer\.kl_coef"):
        LossSettings(kl_coef=-0.1)


def test_advantages_per_loss():
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    groups = ["a", "a", "a", "a", "b", "b"]
    # Group a: mean 0.5, population std 0.5; group b: all equal, std 0, advantage 0.
    unit = 0.5 / (0.5 + GROUP_STD_EPS)
    assert build("grpo").advantages(rewards, groups) == pytest.approx([unit, -unit, -unit, unit, 0.0, 0.0])
    assert build("ppo-clip").advantages(rewards, groups) == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0]
    assert build("k2").advantages(rewards, groups) == [0.5, -0.5, -0.5, 0.5, 0.0, 0.0]


def test_k2_hand_computed_with_a_stale_token_masked():
    # tau = 0.5. Sample 0's last token is stale and leaves both sums:
    #   sum logp = -1.0 - 0.5 = -1.5, sum logp_old = -1.2 - 0.5 = -1.7, log ratio 0.2
    #   0.5 - 0.5 * 0.2 = 0.4 -> 0.16
    # Sample 1 (last position is padding): sums -0.5 and -0.7, log ratio 0.2
    #   -0.5 - 0.5 * 0.2 = -0.6 -> 0.36
    # Mean over the 2 samples: (0.16 + 0.36) / 2 = 0.26
    loss = build("k2", tau=0.5)
    b = batch(
        logprobs=[[-1.0, -0.5, -2.0], [-0.2, -0.3, -9.0]],
        old=[[-1.2, -0.5, -1.0], [-0.4, -0.3, -1.0]],
        mask=[[1, 1, 1], [1, 1, 0]],
        stale=[[0, 0, 1], [0, 0, 0]],
        advantages=[0.5, -0.5],
    )
    assert loss.units(b.loss_mask) == 2
    out = loss(b, loss_denominator(loss.units(b.loss_mask)))
    assert out.loss.item() == pytest.approx(0.26)
    assert out.metrics["log_ratio_abs_mean"].value == pytest.approx(0.2)
    out.loss.backward()
    # d/dlogp_t of (A - tau * log ratio)^2 / 2 = -tau * (A - tau * log ratio): -0.2 and +0.3.
    assert torch.allclose(b.logprobs.grad, torch.tensor([[-0.2, -0.2, 0.0], [0.3, 0.3, 0.0]]))


def test_k2_log_ratio_metric_leaves_out_samples_that_do_not_train():
    """A failed reward's sample (loss mask 0) and a padding copy add nothing to the mean."""
    loss = build("k2", tau=0.5)
    b = batch(logprobs=[[-1.0, -0.5], [-0.3, -0.3]], old=[[-2.0, -0.5], [-0.3, -0.3]], mask=[[1, 1], [0, 0]],
              stale=[[0, 0], [0, 0]], advantages=[0.5, 0.0])
    assert loss(b, 1.0).metrics["log_ratio_abs_mean"].value == pytest.approx(1.0)


def test_grpo_surrogate_hand_computed():
    # clip 0.2: ratios (sample 0, A = 1) 1.5 and 0.9; (sample 1, A = -2) 0.5, then padding.
    #   1.5: min(1.5 * 1, 1.2 * 1) = 1.2 (clipped)      -> -1.2
    #   0.9: min(0.9, 0.9) = 0.9                         -> -0.9
    #   0.5: min(0.5 * -2, 0.8 * -2) = -1.6 (clipped)    -> +1.6
    # Mean over the 3 training tokens: -0.5 / 3; 2 of 3 tokens clipped.
    loss = build("grpo")
    b = batch(
        logprobs=[[-1.0 + math.log(1.5), -1.0 + math.log(0.9)], [-1.0 + math.log(0.5), -7.0]],
        old=[[-1.0, -1.0], [-1.0, -1.0]],
        mask=[[1, 1], [1, 0]],
        advantages=[1.0, -2.0],
    )
    assert loss.units(b.loss_mask) == 3
    out = loss(b, loss_denominator(loss.units(b.loss_mask)))
    assert out.loss.item() == pytest.approx(-0.5 / 3)
    assert out.metrics["ppo_clip_frac"].value == pytest.approx(2 / 3)
    assert out.metrics["tis_capped_frac"].value == 0.0
    out.loss.backward()
    # Clipped tokens have no gradient; the 0.9 token: d(-A * ratio)/dlogp / 3 = -0.9 / 3.
    assert torch.allclose(b.logprobs.grad, torch.tensor([[0.0, -0.3], [0.0, 0.0]]))


@pytest.mark.parametrize("name", ["grpo", "ppo-clip"])
def test_gradient_at_pi_old_is_minus_advantage_over_tokens(name):
    torch.manual_seed(0)
    old = -torch.rand(3, 4) * 3
    mask = [[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]]  # 5 training tokens; the third sample has none
    advantages = [0.7, -1.3, 2.0]
    b = batch(old.tolist(), old.tolist(), mask, advantages)
    loss = build(name)
    out = loss(b, loss_denominator(loss.units(b.loss_mask)))
    out.loss.backward()
    expected = -torch.tensor(advantages).unsqueeze(-1) * torch.tensor(mask, dtype=torch.float) / 5
    assert torch.allclose(b.logprobs.grad, expected)
    assert out.loss.item() == pytest.approx(-(0.7 * 3 - 1.3 * 2) / 5)


def test_truncated_importance_sampling_on_stale_tokens():
    # At ratio 1 with A = 1 each token's term is -w. Stale tokens: pi_old / pi_rollout = 1.5 (kept)
    # and 3.0 (capped at 2.0); the third token is current, w = 1 whatever the two logprobs say.
    #   loss = -(1.5 + 2.0 + 1.0) / 3 = -1.5, gradient -w / 3; half the stale tokens hit the cap.
    old = [[-1.0, -1.0, -1.0]]
    loss = build("grpo", tis_cap=2.0)
    b = batch(old, old, [[1, 1, 1]], [1.0], rollout=[[-1.0 - math.log(1.5), -1.0 - math.log(3.0), -1.0 - math.log(3.0)]],
              stale=[[1, 1, 0]])
    out = loss(b, loss_denominator(loss.units(b.loss_mask)))
    assert out.loss.item() == pytest.approx(-1.5)
    assert out.metrics["tis_capped_frac"].value == pytest.approx(0.5)
    out.loss.backward()
    assert torch.allclose(b.logprobs.grad, torch.tensor([[-0.5, -2 / 3, -1 / 3]]))


def test_k3_kl_to_the_rollout_policy():
    # One token, A = 0, log pi_rollout - log pi = ln 2: k3 = 2 - ln 2 - 1, d k3 / d logp = 1 - 2 = -1.
    b = batch([[-2.0]], [[-2.0]], [[1]], [0.0], rollout=[[-2.0 + math.log(2.0)]])
    out = build("grpo", kl_coef=0.5)(b, 1.0)
    assert out.loss.item() == pytest.approx(0.5 * (1 - math.log(2.0)))
    assert out.metrics["kl"].value == pytest.approx(1 - math.log(2.0))
    out.loss.backward()
    assert b.logprobs.grad.item() == pytest.approx(-0.5)
    # Off by default: the same batch has no loss, but the KL is still measured.
    off = build("grpo")(batch([[-2.0]], [[-2.0]], [[1]], [0.0], rollout=[[-2.0 + math.log(2.0)]]), 1.0)
    assert off.loss.item() == 0.0 and off.metrics["kl"].value == pytest.approx(1 - math.log(2.0))


def test_padding_with_extreme_logprobs_stays_finite():
    b = batch([[-0.5, -300.0]], [[-0.4, 50.0]], [[1, 0]], [1.0], rollout=[[-0.5, 0.0]], stale=[[1, 1]])
    out = build("grpo", kl_coef=0.1)(b, 1.0)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(b.logprobs.grad).all()


def test_stale_tokens_are_generated_by_older_versions():
    versions = torch.tensor([[-1, 3, 4, 5, -1]])
    assert stale_tokens(versions, policy_version=5).tolist() == [[False, True, True, False, False]]


def test_metrics_merge_as_totals_over_counts():
    micro_batches = [
        {"ppo_clip_frac": MetricMean(1, 4), "tis_capped_frac": MetricMean(0, 0)},
        {"ppo_clip_frac": MetricMean(2, 2), "tis_capped_frac": MetricMean(0, 0)},
    ]
    assert merge_metrics(micro_batches) == {"ppo_clip_frac": 0.5, "tis_capped_frac": 0.0}


def test_empty_mini_batch_has_zero_loss():
    b = batch([[-1.0]], [[-1.0]], [[0]], [1.0])
    loss = build("grpo")
    out = loss(b, loss_denominator(loss.units(b.loss_mask)))
    assert out.loss.item() == 0.0


# Two data-parallel ranks with 3 and 1 training tokens: averaging their gradients (what FSDP2
# does) must give the gradient of the token mean over all 4 tokens.
_RANK_BATCHES = [
    dict(logprobs=[[-1.0, -0.7, -0.2]], old=[[-1.1, -0.6, -0.2]], mask=[[1, 1, 1]], advantages=[1.0]),
    dict(logprobs=[[-0.4, -5.0, -5.0]], old=[[-0.6, -5.0, -5.0]], mask=[[1, 0, 0]], advantages=[-2.0]),
]


def _rank_gradient(rank: int, world_size: int, port: int, out_dir: str) -> None:
    # A bounded wait, so that a rank whose peer died does not outlive the test.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    try:
        theta = torch.zeros((), requires_grad=True)  # one shared parameter, shifting every logprob
        spec = _RANK_BATCHES[rank]
        b = batch(spec["logprobs"], spec["old"], spec["mask"], spec["advantages"])
        b.logprobs = b.logprobs.detach() + theta
        loss = get_loss("grpo")(LossSettings())
        loss(b, loss_denominator(loss.units(b.loss_mask), dist.group.WORLD)).loss.backward()
        dist.all_reduce(theta.grad)
        (Path(out_dir) / f"rank{rank}").write_text(repr(theta.grad.item() / 2))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_denominator_makes_rank_average_the_global_token_mean(tmp_path):
    run_two_ranks(_rank_gradient, str(tmp_path))
    averaged = [float((tmp_path / f"rank{rank}").read_text()) for rank in range(2)]

    theta = torch.zeros((), requires_grad=True)
    whole = batch(
        logprobs=[row for spec in _RANK_BATCHES for row in spec["logprobs"]],
        old=[row for spec in _RANK_BATCHES for row in spec["old"]],
        mask=[row for spec in _RANK_BATCHES for row in spec["mask"]],
        advantages=[a for spec in _RANK_BATCHES for a in spec["advantages"]],
    )
    whole.logprobs = whole.logprobs.detach() + theta
    get_loss("grpo")(LossSettings())(whole, 4.0).loss.backward()
    assert averaged[0] == averaged[1] == pytest.approx(theta.grad.item())


def test_zero_advantage_samples_are_left_out_only_where_they_have_no_gradient():
    from trainer_helpers import samples

    batch = samples(4, 50, advantages=[0.0, 1.0, 0.0, -1.0])
    kept, units = get_loss("k2")(LossSettings(kl_coef=0.5)).without_zero_gradients(batch)
    assert kept == [batch[1], batch[3]] and units == 2  # k2 counts samples
    kept, units = get_loss("grpo")(LossSettings()).without_zero_gradients(batch)
    assert kept == [batch[1], batch[3]] and units == len(batch[0].loss_mask) + len(batch[2].loss_mask)  # tokens
    # A KL penalty pulls every token towards the rollout policy, whatever its advantage.
    assert get_loss("grpo")(LossSettings(kl_coef=0.1)).without_zero_gradients(batch) == (batch, 0.0)
    # Nothing with a gradient: one sample stays, so that the optimizer still steps.
    nothing = samples(3, 50, advantages=[0.0])
    assert get_loss("k2")(LossSettings()).without_zero_gradients(nothing) == ([nothing[0]], 2)
