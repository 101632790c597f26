"""The `math` reward: is the response's final answer equal to the gold answer?

Equality is mathematical, not textual (`0.5` equals `\\frac{1}{2}`, `x = 5` answers `5`), which is
what `math_verify` provides. Its default extraction prefers a `\\boxed{...}` answer and
otherwise takes the last expression in the text. A response that keeps math_verify past its time
limit (5 s for its parse, and for each comparison) is a reward error, not a wrong answer.

`reward_spec`:
- `answer` (required): the gold answer, plain or LaTeX.
- `require_number` (default false): the response must state a number, not an expression that
  equals one (`54 - 18` for `36`). Arithmetic tasks need it: a policy otherwise learns to leave
  the arithmetic to the checker. The built-in arithmetic generator switches it on.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import threading
from collections.abc import Iterator

from math_verify import parse, parser, verify
from math_verify.errors import TimeoutException

from rewards.registry import checks_spec, register
from rl.records import RewardResult, Task

_TIMEOUT_SECONDS = 5

# math_verify turns an answer's text into sympy through three paths: LaTeX (an ANTLR parse),
# plain expressions and plain numbers (both a sympy `parse_expr`, about 0.8 ms a response). It
# memoises the first two in 20 entries and the third not at all. A step scores hundreds of responses
# whose answers repeat (a group's K answers, the same small numbers across groups, every
# evaluation), so all three are memoised in wider tables; the values are immutable sympy objects.
_MEMO_SIZE = 4096
parser.parse_latex_cached = functools.lru_cache(maxsize=_MEMO_SIZE)(parser.parse_latex_cached.__wrapped__)
parser.parse_expr_cached = functools.lru_cache(maxsize=_MEMO_SIZE)(parser.parse_expr_cached.__wrapped__)
parser.Number = functools.lru_cache(maxsize=_MEMO_SIZE)(parser.Number)


def _gold(task: Task, timeout: int | None) -> tuple:
    """The task's parsed gold answer; ValueError, naming the task, if it has none."""
    if "answer" not in task.reward_spec:
        raise ValueError(f"task {task.task_id!r}: reward_spec has no 'answer' key")
    gold = _parse_gold(str(task.reward_spec["answer"]), timeout)
    if not gold:
        raise ValueError(
            f"task {task.task_id!r}: cannot parse reward_spec['answer'] "
            f"{task.reward_spec['answer']!r}"
        )
    return gold


def _check_spec(task: Task) -> None:
    # Parsed with the limit that scoring in this thread uses, so that the parse is the one
    # scoring finds in the memo (and math_verify's parser has built its tables by then).
    _gold(task, _timeout_seconds())


@register("math")
@checks_spec(_check_spec)
def math_reward(task: Task, response: str) -> RewardResult:
    """1.0 if the response's answer equals `reward_spec["answer"]`, else 0.0."""
    timeout = _timeout_seconds()
    gold = _gold(task, timeout)
    predicted = _parse_response(task, response, timeout)
    if not predicted:
        return RewardResult(0.0, "no_answer")
    if task.reward_spec.get("require_number", False) and _is_number(gold[0]) and not _is_number(predicted[0]):
        return RewardResult(0.0, "unevaluated_answer")
    if _equal(task, gold, predicted, timeout):
        return RewardResult(1.0, "correct")
    return RewardResult(0.0, "wrong_answer")


# math_verify's own handling of errors, except for its time limit: left to math_verify, a response
# that runs past the limit would score as "no answer" or "wrong", a 0 that says nothing about it.
# Raised, it is a reward error, counted and left out of the training signal.

@contextlib.contextmanager
def _over_time_is_an_error(task: Task, timeout: int | None, doing: str) -> Iterator[None]:
    # math_verify's TimeoutException is a BaseException: the `except Exception` inside passes it on.
    try:
        yield
    except TimeoutException as error:
        raise TimeoutError(f"task {task.task_id!r}: math_verify took over {timeout} s to {doing}") from error


def _parse_response(task: Task, response: str, timeout: int | None) -> list:
    with _over_time_is_an_error(task, timeout, "parse the response"):
        try:
            return parse(response, parsing_timeout=timeout, raise_on_error=True)
        except Exception:  # noqa: BLE001 - what parse returns for any other failure: no answer
            return []


def _equal(task: Task, gold: tuple, predicted: list, timeout: int | None) -> bool:
    """Whether any gold answer equals any predicted one, pair by pair as `verify` goes."""
    with _over_time_is_an_error(task, timeout, "compare the answer"):
        for expected, answer in itertools.product(gold, predicted):
            try:
                if verify(expected, answer, timeout_seconds=timeout, raise_on_error=True):
                    return True
            except Exception:  # noqa: BLE001 - what verify makes of any other failure: this pair differs
                continue
    return False


@functools.lru_cache(maxsize=8192)
def _parse_gold(answer: str, timeout: int | None) -> tuple:
    """The parsed gold answer. Cached: a group's K responses, and every evaluation, share their
    task's answer, and parsing it (LaTeX) costs twice a response's parse."""
    # Wrapping the gold answer in math delimiters lets LaTeX answers
    # (`\frac{1}{2}`, `x^2+1`) parse, which bare-expression extraction rejects.
    return tuple(parse(f"${answer}$", parsing_timeout=timeout))


def _is_number(parsed: object) -> bool:
    """A number, or an equation that names one (`x = 5`, which math_verify gives as Eq(x, 5))."""
    if getattr(parsed, "is_Equality", False) and getattr(parsed.lhs, "is_Symbol", False):
        parsed = parsed.rhs
    return bool(getattr(parsed, "is_Number", False))


def _timeout_seconds() -> int | None:
    """The time limit to give math_verify, or None to run without one.

    math_verify bounds its sympy work with `signal.alarm`, which Python only
    allows on the main thread; anywhere else it raises instead of scoring.
    Scorer worker processes run rewards on their main thread, so they keep the
    limit. Other threads run without it: a pathological expression can then
    stall that thread, which is why bulk scoring belongs in worker processes.
    """
    if threading.current_thread() is threading.main_thread():
        return _TIMEOUT_SECONDS
    return None
