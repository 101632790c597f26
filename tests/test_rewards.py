"""Tests for the rewards package: budget, registry, math reward, scorer."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from rewards import (
    RewardScorer,
    UnknownRewardError,
    apply_budget,
    check_reward_spec,
    checks_spec,
    get_reward,
    register,
    registry,
    reward_names,
)
from rl.records import RewardResult, Task

PLUGIN_MODULE = "k2rl_test_plugin_mod"

PLUGIN_SOURCE = '''
from rl.records import RewardResult


def reward(task, response):
    return RewardResult(float(len(response)), "plugin")


def raises(task, response):
    raise RuntimeError("boom")
'''

PLUGIN_ENTRY_POINTS = f"""\
[k2rl.rewards]
plugin_reward = {PLUGIN_MODULE}:reward
plugin_raises = {PLUGIN_MODULE}:raises
plugin_broken = k2rl_no_such_module:reward
"""


def make_task(reward: str = "math", **reward_spec: object) -> Task:
    return Task(
        task_id="t1",
        messages=({"role": "user", "content": "What is 7 + 5?"},),
        task_type="math",
        reward=reward,
        reward_spec=reward_spec,
    )


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give the test its own registry and entry-point cache, restored afterwards."""
    monkeypatch.setattr(registry, "_REWARDS", dict(registry._REWARDS))
    monkeypatch.setattr(registry, "_entry_points", None)
    monkeypatch.setattr(registry, "_loaded_entry_points", set())


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, isolated_registry: None) -> None:
    """Install a fake distribution declaring `k2rl.rewards` entry points."""
    _distribution(tmp_path, "k2rl_test_plugin", PLUGIN_ENTRY_POINTS)
    (tmp_path / f"{PLUGIN_MODULE}.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, PLUGIN_MODULE, raising=False)


def _distribution(site: Path, name: str, entry_points: str) -> None:
    """The metadata of an installed distribution `name` declaring `entry_points` (entry_points.txt)."""
    dist_info = site / f"{name}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(entry_points)


# Budget


def test_budget_truncated_replaces_score_and_keeps_components() -> None:
    result = RewardResult(1.0, "correct", {"format": 0.5})
    penalised = apply_budget(result, truncated=True, penalty=-0.5)
    assert penalised == RewardResult(
        -0.5,
        "over_budget",
        {"format": 0.5, "task_reward": 1.0, "budget_penalty": -0.5},
    )


def test_budget_not_truncated_returns_result_unchanged() -> None:
    result = RewardResult(1.0, "correct", {"format": 0.5})
    assert apply_budget(result, truncated=False, penalty=-0.5) is result


# Registry


def test_register_and_get(isolated_registry: None) -> None:
    @register("const")
    def const(task: Task, response: str) -> RewardResult:
        return RewardResult(0.25, "const")

    assert get_reward("const") is const
    assert "const" in reward_names()
    register("const")(const)  # re-registering the same function is harmless


def test_register_duplicate_name_raises(isolated_registry: None) -> None:
    register("dup")(lambda task, response: RewardResult(0.0, "a"))
    with pytest.raises(ValueError, match="'dup'"):
        register("dup")(lambda task, response: RewardResult(1.0, "b"))


def test_unknown_reward_message(isolated_registry: None) -> None:
    with pytest.raises(UnknownRewardError) as info:
        get_reward("nope")
    message = str(info.value)
    assert message.startswith("unknown reward 'nope' (registered: ")
    assert "math" in message
    assert "\n" not in message


def test_entry_point_reward(plugin: None) -> None:
    assert {"plugin_reward", "plugin_raises", "math"} <= set(reward_names())
    result = get_reward("plugin_reward")(make_task(), "abc")
    assert result == RewardResult(3.0, "plugin")


def test_entry_point_import_failure_names_entry_point(plugin: None) -> None:
    with pytest.raises(ImportError) as info:
        get_reward("plugin_broken")
    message = str(info.value)
    assert "'plugin_broken'" in message
    assert "ModuleNotFoundError" in message
    assert "\n" not in message


# Math reward


@pytest.mark.parametrize(
    ("answer", "response", "expected"),
    [
        ("12", r"7 + 5 = 12, so \boxed{12}. Check: 3 + 4 = 7.", RewardResult(1.0, "correct")),
        (12, "7 plus 5 is 12, so the answer is 12", RewardResult(1.0, "correct")),
        (r"\frac{1}{2}", "The answer is 0.5", RewardResult(1.0, "correct")),
        ("12", r"I think it is \boxed{13}", RewardResult(0.0, "wrong_answer")),
        ("12", "I do not know.", RewardResult(0.0, "no_answer")),
        # Whatever math-verify judges equal earns the full reward.
        ("5", r"Solving, we get $x = 5$.", RewardResult(1.0, "correct")),
        (r"\frac{1}{2}", "so the answer is 1/2", RewardResult(1.0, "correct")),
        ("36", r"\boxed{54-18}", RewardResult(1.0, "correct")),
        (r"2\sqrt{2}", r"\boxed{\sqrt{8}}", RewardResult(1.0, "correct")),
    ],
)
def test_math_reward(answer: object, response: str, expected: RewardResult) -> None:
    assert get_reward("math")(make_task(answer=answer), response) == expected


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("54 - 18 = }.", RewardResult(0.0, "unevaluated_answer")),
        (r"\boxed{54-18}", RewardResult(0.0, "unevaluated_answer")),
        (r"\boxed{36}", RewardResult(1.0, "correct")),
        (r"\boxed{x = 36}", RewardResult(1.0, "correct")),
        (r"\boxed{x = 54 - 18}", RewardResult(0.0, "unevaluated_answer")),
    ],
)
def test_math_reward_require_number_refuses_unevaluated_answers(response: str, expected: RewardResult) -> None:
    """The arithmetic generator's tasks switch the guard on: leaving the arithmetic to the checker is no answer."""
    assert get_reward("math")(make_task(answer="36", require_number=True), response) == expected


def test_arithmetic_tasks_switch_the_number_guard_on() -> None:
    from rl.data import arithmetic_eval_tasks

    assert all(task.reward_spec["require_number"] is True for task in arithmetic_eval_tasks(5))


def test_math_reward_missing_answer_names_task_and_key() -> None:
    with pytest.raises(ValueError, match=r"'t1'.*'answer'"):
        get_reward("math")(make_task(), r"\boxed{12}")


@pytest.mark.parametrize(
    ("reward_spec", "message"),
    [({}, r"task 't1': reward_spec has no 'answer' key"), ({"answer": ""}, r"task 't1': cannot parse reward_spec\['answer'\] ''")],
)
def test_the_math_reward_checks_a_task_it_could_not_score(reward_spec: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_reward_spec(make_task(**reward_spec))
    check_reward_spec(make_task(answer="12"))


def test_a_reward_with_no_spec_check_passes_every_task(isolated_registry: None) -> None:
    register("unchecked")(lambda task, response: RewardResult(1.0, "ok"))
    check_reward_spec(make_task("unchecked"))
    check_reward_spec(make_task(""))


def test_a_plugin_reward_brings_its_spec_check(isolated_registry: None) -> None:
    def needs_words(task: Task) -> None:
        if "words" not in task.reward_spec:
            raise ValueError(f"task {task.task_id!r}: reward_spec has no 'words'")

    @register("wordy")
    @checks_spec(needs_words)
    def wordy(task: Task, response: str) -> RewardResult:
        return RewardResult(float(len(response.split()) == task.reward_spec["words"]), "wordy")

    with pytest.raises(ValueError, match="no 'words'"):
        check_reward_spec(make_task("wordy"))
    check_reward_spec(make_task("wordy", words=3))


def test_math_reward_off_main_thread() -> None:
    results: list[RewardResult] = []
    thread = threading.Thread(
        target=lambda: results.append(get_reward("math")(make_task(answer="12"), r"\boxed{12}"))
    )
    thread.start()
    thread.join()
    assert results == [RewardResult(1.0, "correct")]


@pytest.mark.parametrize(
    ("stalled", "doing"),
    [("math_verify.parser.extract_target_from_pred", "parse the response"), ("math_verify.grader.sympy_expr_eq", "compare the answer")],
)
def test_a_math_verify_timeout_is_a_reward_error_not_a_wrong_answer(monkeypatch: pytest.MonkeyPatch, stalled: str, doing: str) -> None:
    from rewards import math_answer

    monkeypatch.setattr(math_answer, "_TIMEOUT_SECONDS", 1)
    math_answer._parse_gold("12", 1)  # the gold answer parses before the stall

    def stall(*args: object, **kwargs: object) -> None:
        time.sleep(3)  # math_verify's own alarm ends it after 1 s

    monkeypatch.setattr(stalled, stall)
    [result] = RewardScorer(num_workers=0).score([(make_task(answer="12"), r"\boxed{12}", False)], budget_penalty=0.0)
    assert result.failed
    assert result.reason == f"reward_error: TimeoutError: task 't1': math_verify took over 1 s to {doing}"


# Scorer


def scorer_items() -> list[tuple[Task, str, bool]]:
    return [
        (make_task(answer="12"), r"\boxed{12}", False),
        (make_task(answer="12"), r"\boxed{11}", False),
        (make_task(answer="12"), r"\boxed{12}", True),
        (make_task("plugin_raises"), "anything", False),
        (make_task("plugin_reward"), "abcd", False),
        (make_task(answer="3"), "so the answer is 3", False),
    ]


def expected_scores() -> list[RewardResult]:
    return [
        RewardResult(1.0, "correct"),
        RewardResult(0.0, "wrong_answer"),
        RewardResult(-1.0, "over_budget", {"task_reward": 1.0, "budget_penalty": -1.0}),
        RewardResult(0.0, "reward_error: RuntimeError: boom"),
        RewardResult(4.0, "plugin"),
        RewardResult(1.0, "correct"),
    ]


def _without_tracebacks(results: list[RewardResult]) -> list[RewardResult]:
    """A reward that raised is marked failed and carries its traceback; compare the rest."""
    for result in results:
        assert result.failed == result.reason.startswith("reward_error")
        assert not result.failed or "RuntimeError: boom" in result.error
    return [RewardResult(r.score, r.reason, r.components) for r in results]


def test_scorer_in_process(plugin: None) -> None:
    with RewardScorer(num_workers=0) as scorer:
        assert _without_tracebacks(scorer.score(scorer_items(), budget_penalty=-1.0)) == expected_scores()


def test_scorer_worker_processes(plugin: None) -> None:
    with RewardScorer(num_workers=2) as scorer:
        assert _without_tracebacks(scorer.score(scorer_items(), budget_penalty=-1.0)) == expected_scores()
        # The pool is reused across calls.
        assert scorer.score(scorer_items()[:2], budget_penalty=-1.0) == expected_scores()[:2]


def test_scorer_unknown_reward_fails_whole_call(isolated_registry: None) -> None:
    with RewardScorer(num_workers=0) as scorer:
        with pytest.raises(UnknownRewardError):
            scorer.score([(make_task("nope"), "x", False)], budget_penalty=-1.0)


def test_a_reward_that_returns_no_result_or_no_finite_score_fails(isolated_registry: None) -> None:
    register("returns-a-float")(lambda task, response: 1.0)
    register("returns-nan")(lambda task, response: RewardResult(float("nan"), "ok"))
    with RewardScorer(num_workers=0) as scorer:
        results = scorer.score([(make_task("returns-a-float"), "x", False), (make_task("returns-nan"), "x", False)],
                               budget_penalty=0.0)
    assert all(result.failed for result in results)
    assert "returned float, not a RewardResult" in results[0].reason
    assert "returned the score nan, not a finite number" in results[1].reason


def test_a_reward_name_two_distributions_declare_is_refused(plugin: None, tmp_path: Path) -> None:
    _distribution(tmp_path, "k2rl_other_plugin", "[k2rl.rewards]\nplugin_reward = k2rl_other_module:reward\n")
    with pytest.raises(ValueError, match="reward 'plugin_reward' is declared by more than one installed entry point: "
                                         f"k2rl_other_module:reward, {PLUGIN_MODULE}:reward"):
        get_reward("plugin_reward")


def test_an_entry_point_named_like_a_registered_reward_is_refused(plugin: None, tmp_path: Path) -> None:
    _distribution(tmp_path, "k2rl_shadow_plugin", "[k2rl.rewards]\nmath = k2rl_shadow_module:reward\n")
    with pytest.raises(ValueError, match="reward 'math' is registered to rewards.math_answer.math_reward and also declared by "
                                         "the installed entry point k2rl_shadow_module:reward"):
        get_reward("math")
    # The entry point's own reward still loads, and loads again.
    assert get_reward("plugin_reward") is get_reward("plugin_reward")
