import math

import pytest

from rl.schedule import Schedule


def at(value, *steps):
    schedule = Schedule.parse(value, "rollout.temperature")
    return [schedule.at(step) for step in steps]


def test_a_number_is_a_constant_temperature():
    assert at(0.8, 0, 10, 10_000) == [0.8, 0.8, 0.8]
    assert at({"schedule": "constant", "start": 0.9}, 0, 500) == [0.9, 0.9]


def test_linear():
    # 1.0 -> 0.6 over 4 steps: -0.1 per step, then it stays at 0.6.
    assert at({"schedule": "linear", "start": 1.0, "end": 0.6, "steps": 4}, 0, 1, 2, 4, 9) == pytest.approx([1.0, 0.9, 0.8, 0.6, 0.6])


def test_cosine():
    # Half-way the cosine term is (1 + cos(pi / 2)) / 2 = 0.5; a quarter of the way (1 + sqrt(2)/2) / 2.
    values = at({"schedule": "cosine", "start": 1.0, "end": 0.5, "steps": 100}, 0, 25, 50, 100, 150)
    quarter = 0.5 + 0.5 * (1 + math.sqrt(2) / 2) / 2
    assert values == pytest.approx([1.0, quarter, 0.75, 0.5, 0.5])


def test_exponential():
    # 1.0 -> 0.25 over 2 steps: halved each step.
    assert at({"schedule": "exponential", "start": 1.0, "end": 0.25, "steps": 2}, 0, 1, 2, 3) == pytest.approx([1.0, 0.5, 0.25, 0.25])


def test_a_rising_schedule_is_allowed():
    assert at({"schedule": "linear", "start": 0.5, "end": 1.0, "steps": 5}, 5) == [1.0]


def test_whole_number_floats_are_step_counts():
    # The config reads numbers in the mapping as floats.
    assert Schedule.parse({"schedule": "linear", "start": 1.0, "end": 0.5, "steps": 10.0}, "rollout.temperature").steps == 10


@pytest.mark.parametrize(
    "value, message",
    [
        (0.0, r"rollout\.temperature must be > 0, got 0\.0"),
        ({"start": -1}, r"rollout\.temperature\.start must be > 0, got -1\.0"),
        ({"schedule": "linear", "start": 1.0, "end": 0.5, "steps": 0}, r"rollout\.temperature\.steps must be > 0 for a linear schedule"),
        ({"schedule": "cosine", "start": 1.0, "end": -0.1, "steps": 10}, r"rollout\.temperature\.end must be > 0"),
        ({"schedule": "step", "start": 1.0, "end": 0.5, "steps": 10}, r"rollout\.temperature\.schedule must be one of constant, linear, cosine, exponential, got 'step'"),
        ({"schedule": "linear", "start": 1.0, "steps": 10}, r"rollout\.temperature\.end is required for a linear schedule"),
        ({"schedule": "cosin", "start": 1.0}, r"rollout\.temperature\.schedule must be one of constant, linear, cosine, exponential, got 'cosin'"),
        ({"schedule": "linear", "end": 1.0, "steps": 10}, r"rollout\.temperature\.start is required"),
        ({"schedule": "linear", "start": 1.0, "end": 0.5, "steps": 2.5}, r"rollout\.temperature\.steps must be a whole number"),
        ({"schedule": "linear", "start": "hot", "end": 0.5, "steps": 2}, r"rollout\.temperature\.start must be a number, got 'hot'"),
        ({"schedule": "constant", "start": 1.0, "end": 0.5}, r"rollout\.temperature: a constant schedule cannot end"),
        ({"start": 1.0, "decay": 0.9}, r"unknown key rollout\.temperature\.decay"),
        ("warm", r"rollout\.temperature must be a number, got 'warm'"),
    ],
)
def test_bad_schedules_name_the_key(value, message):
    with pytest.raises(ValueError, match=message):
        Schedule.parse(value, "rollout.temperature")


def test_negative_step_is_an_error():
    with pytest.raises(ValueError, match="step must be >= 0"):
        Schedule.parse(1.0, "rollout.temperature").at(-1)


def test_a_learning_rate_may_decay_to_zero():
    assert [Schedule.parse({"schedule": "linear", "start": 1e-4, "end": 0.0, "steps": 4}, "trainer.lr", zero_allowed=True).at(step)
            for step in (0, 2, 4)] == pytest.approx([1e-4, 5e-5, 0.0])
    assert Schedule.parse(0.0, "trainer.lr", zero_allowed=True).at(0) == 0.0
    with pytest.raises(ValueError, match=r"trainer\.lr\.end must be > 0 on an exponential schedule, got 0\.0"):
        Schedule.parse({"schedule": "exponential", "start": 1e-4, "end": 0.0, "steps": 4}, "trainer.lr", zero_allowed=True)
    with pytest.raises(ValueError, match=r"trainer\.lr must be >= 0, got -1\.0"):
        Schedule.parse(-1.0, "trainer.lr", zero_allowed=True)
