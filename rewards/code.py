"""The `code` reward: run the response's program in a sandbox against unit tests or judge cases.

`reward_spec` carries either
- `tests`: Python code appended after the program; the run passes only if the
  tests ran to completion (see `_unit_test_script`), or
- `cases`: `[{"input": ..., "output": ...}, ...]`; the program runs once per case
  with `input` on stdin and must print `output` (whitespace-normalised).
Score 1.0 if everything passes, else 0.0; with `"partial": true`, the fraction of
cases passed. Reasons name the first failure: `compile_error`, `wrong_answer on
case 3`, `timeout on case 2`, `memory_limit`, `output_limit`, `tests_failed`, ...
"""

from __future__ import annotations

import re
import secrets

from rewards.registry import blocking_reward, register
from rl.records import RewardResult, Task
from sandboxes import STATUS_SANDBOX_ERROR, RunRequest, RunResult, Sandbox
from sandboxes.shared import shared_sandbox

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)

def extract_program(response: str) -> str:
    """The last fenced code block, else the whole response."""
    blocks = _FENCE.findall(response)
    return (blocks[-1] if blocks else response).strip()


def _normalise(text: str) -> list[str]:
    return [line.rstrip() for line in text.strip().splitlines()]


def _failure_reason(result: RunResult, where: str) -> str:
    """`timeout on case 2`, or `wrong_answer on case 2` when the program ran but printed the wrong thing."""
    return f"{'wrong_answer' if result.status == 'ok' else result.status} {where}"


def _unit_test_script(program: str, tests: str, token: str) -> str:
    """Program, then tests, then a line that prints a per-run random token.

    A program that exits early (`sys.exit(0)`, `os._exit`) or prints a fake
    "all passed" never reaches the token line, so it cannot pass; the token is
    fresh for every run and is not in any file the program can read. It does sit
    in the script's own code object, so a program that inspects its interpreter
    could still find it.
    """
    # The token on a line of its own, after whatever the program and the tests printed without a newline.
    return f"{program}\n\n{tests}\n\nprint('\\n' + {token!r}, flush=True)\n"


def _run_unit_tests(sandbox: Sandbox, program: str, tests: str) -> RewardResult:
    token = f"K2RL-TESTS-DONE-{secrets.token_hex(16)}"
    script = _unit_test_script(program, tests, token)
    # The script goes in on stdin (`python3 -`), so no file in the scratch dir holds the token.
    result = _checked(sandbox.run_sync(RunRequest(files={}, command=("python3", "-"), stdin=script)))
    if result.status != "ok":
        reason = "tests_failed" if result.status == "runtime_error" else result.status
        return RewardResult(0.0, reason)
    lines = result.stdout.rstrip("\n").splitlines()
    if not lines or lines[-1] != token:
        return RewardResult(0.0, "tests_not_completed")
    return RewardResult(1.0, "passed")


def _run_cases(sandbox: Sandbox, program: str, cases: list[dict], partial: bool) -> RewardResult:
    passed, first_failure = 0, ""
    for number, case in enumerate(cases, start=1):
        if not isinstance(case, dict) or "input" not in case or "output" not in case:
            raise ValueError(f"case {number} needs 'input' and 'output'")
        result = _checked(sandbox.run_sync(
            RunRequest(files={"main.py": program}, command=("python3", "main.py"), stdin=str(case["input"]))
        ))
        if result.status == "ok" and _normalise(result.stdout) == _normalise(str(case["output"])):
            passed += 1
            continue
        first_failure = first_failure or _failure_reason(result, f"on case {number}")
        if not partial:
            break
    score = passed / len(cases) if partial else float(passed == len(cases))
    return RewardResult(score, "passed" if passed == len(cases) else first_failure, {"cases_passed": float(passed)})


def _checked(result: RunResult) -> RunResult:
    """The sandbox's result, unless the program never ran: that is the sandbox's failure, not the
    program's, and fails the reward (counted and reported) instead of scoring the response 0."""
    if result.status == STATUS_SANDBOX_ERROR:
        raise RuntimeError(f"the sandbox could not run the program: {result.stderr.strip() or 'no detail'}")
    return result


@register("code")
@blocking_reward
def code_reward(task: Task, response: str) -> RewardResult:
    spec = task.reward_spec
    if "tests" not in spec and "cases" not in spec:
        raise ValueError(f"task {task.task_id!r}: reward_spec needs 'tests' or 'cases'")
    program = extract_program(response)
    if not program:
        return RewardResult(0.0, "no_code")
    try:
        compile(program, "main.py", "exec")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        # The last two: a response nested or long enough to exhaust the compiler.
        return RewardResult(0.0, "compile_error")
    sandbox = shared_sandbox()
    if "tests" in spec:
        return _run_unit_tests(sandbox, program, str(spec["tests"]))
    cases = spec["cases"]
    if not isinstance(cases, list) or not cases:
        raise ValueError(f"task {task.task_id!r}: 'cases' must be a non-empty list")
    return _run_cases(sandbox, program, cases, bool(spec.get("partial", False)))
