import pytest

from rewards.length import LengthReward, length_lambdas


def test_hand_computed_group():
    # Lengths 10..30, span 20: lambda = 0.5 - (len - 10) / 20.
    #   correct, 10 -> 0.5        wrong, 10 -> min(0, 0.5) = 0
    #   correct, 20 -> 0.0        wrong, 25 -> min(0, -0.25) = -0.25
    #   correct, 30 -> -0.5
    group = [(1.0, 10), (0.0, 10), (1.0, 20), (0.0, 25), (1.0, 30)]
    assert length_lambdas(group) == pytest.approx([0.5, 0.0, 0.0, -0.25, -0.5])


def test_equal_lengths_give_nothing():
    assert length_lambdas([(1.0, 7), (0.0, 7), (1.0, 7)]) == [0.0, 0.0, 0.0]
    assert length_lambdas([(1.0, 7)]) == [0.0]
    assert length_lambdas([]) == []


def test_correct_means_reward_at_least_one():
    # 0.9 is not correct: its positive lambda is dropped; 1.5 (a bonus reward) is.
    assert length_lambdas([(0.9, 0), (1.5, 0), (1.0, 4)]) == pytest.approx([0.0, 0.5, -0.5])


def test_weight_and_warmup():
    group = [(1.0, 10), (0.0, 30)]
    reward = LengthReward(weight=0.2, warmup_steps=3)
    assert reward.additions(group, step=0) == [0.0, 0.0]
    assert reward.additions(group, step=2) == [0.0, 0.0]
    # From the fourth step on: 0.2 * 0.5 and 0.2 * min(0, -0.5).
    assert reward.additions(group, step=3) == pytest.approx([0.1, -0.1])
    assert LengthReward().additions(group, step=100) == [0.0, 0.0]


def test_bad_settings_name_their_key():
    with pytest.raises(ValueError, match=r"reward\.length\.weight must be >= 0"):
        LengthReward(weight=-1.0)
    with pytest.raises(ValueError, match=r"reward\.length\.warmup_steps must be >= 0"):
        LengthReward(weight=1.0, warmup_steps=-2)
