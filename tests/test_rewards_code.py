"""The `code` reward's judging logic, on the local backend and on the Docker backend."""

import asyncio
import os

import pytest

from rewards import RewardScorer, get_reward
from rewards.code import extract_program
from sandboxes.shared import use_sandbox
from rl.records import EpisodeStatus, Task, Trajectory
from sandboxes import STATUS_SANDBOX_ERROR, RunResult, SandboxConfig, SandboxLimits, docker_available, open_sandbox


@pytest.fixture(scope="module", autouse=True, params=["local", "docker"])
def code_sandbox(request):
    if request.param == "docker" and (reason := docker_available()) is not None:
        if os.environ.get("K2RL_REQUIRE_DOCKER") == "1":
            pytest.fail(f"K2RL_REQUIRE_DOCKER=1 but the Docker sandbox is unavailable: {reason}")
        pytest.skip(f"Docker sandbox unavailable: {reason}")
    limits = SandboxLimits(timeout_s=3.0)
    sandbox = open_sandbox(SandboxConfig(backend=request.param, pool_size=2, limits=limits))
    use_sandbox(sandbox)
    yield sandbox
    use_sandbox(None)
    sandbox.close()


def score(spec: dict, response: str):
    return get_reward("code")(Task("c1", (), "code", "code", spec), response)


TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
CASES = [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -4", "output": "6"}]


def test_extracts_the_last_fenced_block_else_the_whole_text():
    assert extract_program("intro\n```python\nx = 1\n```\nthen\n```py\ny = 2\n```") == "y = 2"
    assert extract_program("print(1)") == "print(1)"


def test_unit_tests_pass_and_fail():
    assert score({"tests": TESTS}, "```python\ndef add(a, b):\n    return a + b\n```").reason == "passed"
    wrong = score({"tests": TESTS}, "def add(a, b):\n    return a - b")
    assert (wrong.score, wrong.reason) == (0.0, "tests_failed")


@pytest.mark.parametrize(
    "cheat",
    [
        "import sys\ndef add(a, b): return 0\nsys.exit(0)",
        "import os\ndef add(a, b): return 0\nprint('All tests passed'); os._exit(0)",
        "def add(a, b): return 0\nraise SystemExit",
    ],
)
def test_reporting_success_without_running_the_tests_fails(cheat):
    result = score({"tests": TESTS}, cheat)
    assert result.score == 0.0 and result.reason in ("tests_not_completed", "tests_failed")


def test_judge_cases():
    program = "a, b = map(int, input().split())\nprint(a + b)"
    assert score({"cases": CASES}, program).score == 1.0
    wrong = score({"cases": CASES}, "a, b = map(int, input().split())\nprint(a * b if a == 10 else a + b)")
    assert (wrong.score, wrong.reason) == (0.0, "wrong_answer on case 2")
    partial = score({"cases": CASES, "partial": True}, "a, b = map(int, input().split())\nprint(a + b if a == 2 else 0)")
    assert partial.score == 0.5


def test_bad_programs_and_records():
    assert score({"cases": CASES}, "").reason == "no_code"
    assert score({"cases": CASES}, "def f(:\n  pass").reason == "compile_error"
    assert score({"cases": CASES}, "while True: pass").reason == "timeout on case 1"
    with pytest.raises(ValueError, match="'tests' or 'cases'"):
        score({}, "print(1)")


def test_a_program_that_prints_without_a_newline_passes_its_tests():
    program = "import sys\ndef add(a, b):\n    return a + b\nsys.stdout.write('no newline')"
    assert score({"tests": TESTS + "print('tests done', end='')"}, program).reason == "passed"


def test_a_program_too_deep_to_compile_is_a_compile_error():
    assert score({"cases": CASES}, "x = " + "-" * 100_000 + "1").reason == "compile_error"


def test_the_rollout_scores_code_in_its_event_loop_without_scorer_processes():
    """The default `reward.num_workers: 0`: episodes are scored in the rollout's event loop, where
    a sandbox run cannot block; the code reward runs in a thread of its own."""
    task = Task("c1", (), "code", "code", {"tests": TESTS})
    episode = Trajectory(task, "g", 0, [1], [2], [1], [-0.1], [0], [1.0], status=EpisodeStatus.COMPLETED)
    episode.response_text = "def add(a, b):\n    return a + b"
    with RewardScorer(num_workers=0) as scorer:
        result = asyncio.run(scorer.score_episode(episode, budget_penalty=0.0))
    assert (result.score, result.reason, result.failed) == (1.0, "passed", False)


class _BrokenSandbox:
    """A sandbox whose engine cannot start programs (a real one cannot be made to fail on cue)."""

    def run_sync(self, request, limits=None):
        return RunResult(STATUS_SANDBOX_ERROR, None, "", "no container could be started", 0.0)


def test_a_sandbox_that_cannot_run_the_program_fails_the_reward_instead_of_scoring_it(code_sandbox):
    use_sandbox(_BrokenSandbox())
    try:
        with RewardScorer(num_workers=0) as scorer:
            [result] = scorer.score([(Task("c1", (), "code", "code", {"cases": CASES}), "print(5)", False)], budget_penalty=0.0)
    finally:
        use_sandbox(code_sandbox)
    assert result.failed and "no container could be started" in result.reason
