import json
import random
from collections import Counter

import pytest

from rl.data import PromptSampler, arithmetic_eval_tasks
from rl.data.arithmetic import ARITHMETIC_DIFFICULTY, arithmetic_kind, arithmetic_problem
from rl.data.curriculum import Curriculum, SuccessRates
from rl.records import Task

# Chi-square critical value at p = 0.001: with a fixed seed the test is deterministic, and a
# correct sampler sits far below it.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27}


def task(task_id: str, difficulty: float | None = None) -> Task:
    return Task(task_id, ({"role": "user", "content": task_id},), "math", "math", {"answer": "1"}, difficulty=difficulty)


def chi_square(counts: Counter, probabilities: dict, draws: int) -> float:
    return sum((counts[key] - draws * p) ** 2 / (draws * p) for key, p in probabilities.items())


def test_default_generator_draws_what_it_always_has():
    rng = random.Random(0)
    problems = [(p.question, p.answer) for p in (arithmetic_problem(rng) for _ in range(3))]
    assert problems == [
        ("Eva has 18 shells and finds 34 more. How many shells does Eva have now?", 52),
        ("Ben has 71 shells and gives away 46. How many shells are left?", 25),
        ("Omar has 4 bags with 6 pens in each. How many pens are there in total?", 24),
    ]
    drawn = PromptSampler(None, seed=0, eval_tasks=[]).sample(300)
    assert {arithmetic_kind(t) for t in drawn} == {"add", "sub", "mul"}
    assert all(t.difficulty == ARITHMETIC_DIFFICULTY[arithmetic_kind(t)] for t in drawn)


def test_hard_fraction_mixes_in_two_digit_multiplications():
    rng = random.Random(1)
    problems = [arithmetic_problem(rng, hard_fraction=0.3) for _ in range(2000)]
    hard = [p for p in problems if p.kind == "mul-2x2"]
    assert 0.27 < len(hard) / len(problems) < 0.33
    assert all(10 <= p.a <= 99 and 10 <= p.b <= 99 and p.answer == p.a * p.b for p in hard)
    assert {p.kind for p in problems} == {"add", "sub", "mul", "mul-2x2"}


def test_prioritised_pool_frequencies_follow_the_formula():
    pool = [task("solved"), task("half"), task("mostly"), task("unseen")]
    rates = SuccessRates(floor=0.05)
    sampler = PromptSampler(pool, seed=0, eval_tasks=[], success_rates=rates)
    # Success rates 1.0, 0.5, 0.9 and (never reported) 0.0.
    sampler.update([pool[0]] * 2 + [pool[1]] * 2 + [pool[2]] * 10, [1, 1, 1, 0] + [1] * 9 + [0])
    assert [rates.rate(t.task_id) for t in pool] == pytest.approx([1.0, 0.5, 0.9, 0.0])
    # Weights max(1 - s, 0.05): 0.05, 0.5, 0.1, 1.0, out of 1.65.
    weights = {"solved": 0.05, "half": 0.5, "mostly": 0.1, "unseen": 1.0}
    draws = 20_000
    counts = Counter(t.task_id for _ in range(100) for t in sampler.sample(draws // 100))
    probabilities = {key: weight / 1.65 for key, weight in weights.items()}
    assert chi_square(counts, probabilities, draws) < CHI2_999[3]


def test_prioritised_generator_tracks_each_kind():
    rates = SuccessRates(floor=0.05)
    sampler = PromptSampler(None, seed=0, eval_tasks=[], success_rates=rates, hard_fraction=0.25)
    first = sampler.sample(200)
    # Every addition solved, every other kind failed.
    sampler.update(first, [float(arithmetic_kind(t) == "add") for t in first])
    assert rates.rate("add") == 1.0 and rates.rate("mul-2x2") == 0.0
    # Weights: mix share x priority = 0.25 x 0.05 for add, 0.25 x 1 for the other three.
    total = 0.25 * 0.05 + 3 * 0.25
    probabilities = {"add": 0.25 * 0.05 / total, **{kind: 0.25 / total for kind in ("sub", "mul", "mul-2x2")}}
    draws = 4000
    counts = Counter(arithmetic_kind(t) for t in sampler.sample(draws))
    assert chi_square(counts, probabilities, draws) < CHI2_999[3]


def test_success_rates_are_a_moving_average():
    rates = SuccessRates(smoothing=0.5)
    rates.update(["a", "a"], [1, 0])
    assert rates.rate("a") == 0.5  # the first report sets the rate
    rates.update(["a", "a"], [1, 1])
    assert rates.rate("a") == 0.75
    assert rates.weight("a") == 0.25 and rates.weight("never") == 1.0


def test_curriculum_opens_the_pool_easy_first():
    difficulties = [5, 1, 3, 2, 4, 1]
    pool = [task(f"t{i}-d{d}", d) for i, d in enumerate(difficulties)]
    sampler = PromptSampler(pool, seed=0, eval_tasks=[], curriculum=Curriculum(steps=4, start_fraction=0.25))
    seen = [{t.task_id for t in sampler.sample(300)} for _ in range(6)]
    # Eligible after s steps: ceil(6 * max(0.25, s / 4)) = 2, 2, 3, 5, 6, 6 tasks, easiest first
    # (the two difficulty-1 tasks in pool order).
    assert seen[0] == seen[1] == {"t1-d1", "t5-d1"}
    assert seen[2] == {"t1-d1", "t5-d1", "t3-d2"}
    assert seen[3] == {"t1-d1", "t5-d1", "t3-d2", "t2-d3", "t4-d4"}
    assert seen[4] == seen[5] == {t.task_id for t in pool}


def test_curriculum_on_the_generator_opens_kinds_by_difficulty():
    sampler = PromptSampler(None, seed=0, eval_tasks=[], curriculum=Curriculum(steps=2, start_fraction=0.3))
    # Three kinds: ceil(3 * 0.3) = 1, then ceil(3 * 0.5) = 2, then all 3.
    assert [{arithmetic_kind(t) for t in sampler.sample(100)} for _ in range(3)] == [
        {"add"}, {"add", "sub"}, {"add", "sub", "mul"},
    ]


def test_curriculum_needs_every_difficulty():
    pool = [task("a", 1.0), task("b"), task("c")]
    with pytest.raises(ValueError, match=r"data\.curriculum needs a difficulty for every task; task 'b' has none"):
        PromptSampler(pool, seed=0, eval_tasks=[], curriculum=Curriculum(steps=10))


@pytest.mark.parametrize("generated", [False, True])
def test_state_survives_a_json_round_trip_exactly(generated):
    pool = None if generated else [task(f"t{i}", i % 4) for i in range(12)]
    eval_tasks = arithmetic_eval_tasks(50)

    def fresh(seed: int) -> PromptSampler:
        return PromptSampler(pool, seed=seed, eval_tasks=eval_tasks, curriculum=Curriculum(steps=5),
                             success_rates=SuccessRates(floor=0.1, smoothing=0.3), hard_fraction=0.2)

    sampler = fresh(seed=7)
    outcome = random.Random(3)
    for _ in range(3):
        tasks = sampler.sample(8)
        sampler.update(tasks, [outcome.random() for _ in tasks])
    restored = fresh(seed=99)
    restored.load_state_dict(json.loads(json.dumps(sampler.state_dict())))
    assert restored.state_dict() == sampler.state_dict()
    for _ in range(3):
        expected, got = sampler.sample(8), restored.sample(8)
        assert got == expected
        successes = [outcome.random() for _ in expected]
        sampler.update(expected, successes)
        restored.update(got, successes)


def test_plain_pool_passes_are_unchanged_by_the_new_options():
    pool = [task(f"t{i}") for i in range(5)]
    sampler = PromptSampler(pool, seed=0, eval_tasks=[])
    # Each pass of 5 hands out every task once; updates without prioritised sampling change nothing.
    first, second = sampler.sample(5), sampler.sample(5)
    sampler.update(first, [1.0] * 5)
    assert sorted(t.task_id for t in first) == sorted(t.task_id for t in second) == [t.task_id for t in pool]


def test_bad_input_names_the_cause():
    with pytest.raises(ValueError, match=r"data\.curriculum\.steps must be > 0"):
        Curriculum(steps=0)
    with pytest.raises(ValueError, match=r"data\.curriculum\.start_fraction must be in \(0, 1\]"):
        Curriculum(steps=10, start_fraction=0.0)
    with pytest.raises(ValueError, match=r"data\.prioritized\.floor must be in \(0, 1\]"):
        SuccessRates(floor=0.0)
    with pytest.raises(ValueError, match=r"data\.prioritized\.smoothing must be in \(0, 1\]"):
        SuccessRates(smoothing=1.5)
    with pytest.raises(ValueError, match=r"data\.arithmetic_hard_fraction must be in \[0, 1\]"):
        PromptSampler(None, seed=0, eval_tasks=[], hard_fraction=1.5)
    sampler = PromptSampler([task("a")], seed=0, eval_tasks=[], success_rates=SuccessRates())
    with pytest.raises(ValueError, match="2 tasks but 1 successes"):
        sampler.update([task("a"), task("a")], [1.0])
    with pytest.raises(ValueError, match=r"success of task 'a' must be in \[0, 1\], got 2"):
        sampler.update([task("a")], [2])
    with pytest.raises(ValueError, match=r"task 'a' is not a generated arithmetic task"):
        arithmetic_kind(task("a", 1.0))
