"""The `instruction` reward: does the response obey verifiable formatting constraints?

IFEval-style instruction data pairs a prompt with constraints a program can check
("at most 50 words", "no commas", "answer in JSON"), so the reward needs no judge
model and leaves nothing to argue about. `reward_spec["constraints"]` lists them
as `{"type": ..., **params}`; each type is one checker in `CONSTRAINT_CHECKERS`,
and a new type is one more function decorated with `@constraint`.

The score is all-or-nothing by default, like IFEval's strict accuracy: a response
that breaks one of three constraints did not follow the instruction. With
`reward_spec["partial"] = True` it is the fraction of constraints met, a denser
signal for prompts with many constraints. Counting constraints (`word_count`,
`sentence_count`, `paragraph_count`, `keyword_frequency`, `bullet_count`) take
either an exact `count` or inclusive `min` and/or `max` bounds.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rewards.registry import register
from rl.records import RewardResult, Task

Params = Mapping[str, Any]
Check = Callable[[str, Params], bool]


@dataclass(frozen=True)
class ConstraintChecker:
    """One constraint type: its check and the parameter names it accepts."""

    check: Check
    params: frozenset[str]


CONSTRAINT_CHECKERS: dict[str, ConstraintChecker] = {}

_RANGE = ("count", "min", "max")

# A word is a run of letters or digits, with inner apostrophes and hyphens
# ("don't", "well-known") kept inside it.
_WORD = re.compile(r"\w+(?:['’-]\w+)*")
# Sentences end at . ! or ? followed by whitespace, or at a blank line. Abbreviations
# such as "e.g. this" are over-counted, which is the usual price of a rule-based split.
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
# A markdown bullet: `* ` or `- ` at the start of a line, so `**bold**` and `---` are not bullets.
_BULLET = re.compile(r"^[ \t]*[*-][ \t]+\S", re.MULTILINE)
_JSON_FENCE = re.compile(r"```(?:json)?[ \t]*\n(.*?)\n?```", re.DOTALL | re.IGNORECASE)


class _InvalidParams(ValueError):
    """A constraint's parameters are missing or malformed (a bad task, not a bad response)."""


def constraint(name: str, *params: str) -> Callable[[Check], Check]:
    """Register the decorated `check(response, params) -> bool` as constraint type `name`.

    Declaring the accepted parameters makes a misspelt one (`maximum` for `max`)
    an error instead of a constraint that is silently never checked.
    """

    def decorator(check: Check) -> Check:
        CONSTRAINT_CHECKERS[name] = ConstraintChecker(check, frozenset(params))
        return check

    return decorator


@register("instruction")
def instruction_reward(task: Task, response: str) -> RewardResult:
    """1.0 if the response meets every constraint, else 0.0 (or the fraction met, if partial)."""
    if "constraints" not in task.reward_spec:
        raise ValueError(f"task {task.task_id!r}: reward_spec has no 'constraints' key")
    constraints = task.reward_spec["constraints"]
    if not isinstance(constraints, list) or not constraints:
        raise ValueError(
            f"task {task.task_id!r}: reward_spec['constraints'] must be a non-empty list, "
            f"got {constraints!r}"
        )
    partial = task.reward_spec.get("partial", False)
    if not isinstance(partial, bool):
        raise ValueError(f"task {task.task_id!r}: reward_spec['partial'] must be a bool, got {partial!r}")

    components: dict[str, float] = {}
    failed: list[str] = []
    for index, spec in enumerate(constraints):
        passed = _check(task, index, spec, response)
        components[f"{index}:{spec['type']}"] = float(passed)
        if not passed:
            failed.append(spec["type"])

    if partial:
        score = 1.0 - len(failed) / len(constraints)
    else:
        score = 0.0 if failed else 1.0
    reason = f"failed: {', '.join(failed)}" if failed else "all_passed"
    return RewardResult(score, reason, components)


def _check(task: Task, index: int, spec: object, response: str) -> bool:
    """Run one constraint, turning any problem with the constraint itself into a one-line error."""
    where = f"task {task.task_id!r}: constraint {index} {spec!r}"
    if not isinstance(spec, Mapping) or not isinstance(spec.get("type"), str):
        raise ValueError(f"{where}: expected an object with a string 'type'")
    checker = CONSTRAINT_CHECKERS.get(spec["type"])
    if checker is None:
        known = ", ".join(sorted(CONSTRAINT_CHECKERS))
        raise ValueError(f"{where}: unknown constraint type (known: {known})")
    params = {key: value for key, value in spec.items() if key != "type"}
    unexpected = sorted(params.keys() - checker.params)
    if unexpected:
        accepted = ", ".join(sorted(checker.params)) or "none"
        raise ValueError(f"{where}: unexpected parameter(s) {', '.join(unexpected)} (accepted: {accepted})")
    try:
        return checker.check(response, params)
    except _InvalidParams as error:
        raise ValueError(f"{where}: {error}") from None


# Parameter readers. Every check reads all of its parameters whatever the response,
# so a bad constraint fails on every response, not only on some of them.


def _count(params: Params, name: str) -> int | None:
    value = params.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise _InvalidParams(f"{name!r} must be a non-negative integer, got {value!r}")
    return value


def _in_range(value: int, params: Params) -> bool:
    """Whether `value` equals `count`, or lies within the inclusive `min`/`max` bounds."""
    exact, low, high = _count(params, "count"), _count(params, "min"), _count(params, "max")
    if exact is not None:
        if low is not None or high is not None:
            raise _InvalidParams("give either 'count' or 'min'/'max', not both")
        return value == exact
    if low is None and high is None:
        raise _InvalidParams("needs 'count', 'min' or 'max'")
    if low is not None and high is not None and low > high:
        raise _InvalidParams(f"'min' ({low}) exceeds 'max' ({high})")
    return (low is None or value >= low) and (high is None or value <= high)


def _text(params: Params, name: str) -> str:
    value = params.get(name)
    if not isinstance(value, str) or not value.strip():
        raise _InvalidParams(f"{name!r} must be a non-empty string, got {value!r}")
    return value.strip()


def _texts(params: Params, name: str) -> list[str]:
    value = params.get(name)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise _InvalidParams(f"{name!r} must be a non-empty list of non-empty strings, got {value!r}")
    return [v.strip() for v in value]


# Text measures.


def _occurrences(phrase: str, text: str) -> int:
    """Case-insensitive whole-word occurrences: `cat` is not found in `concatenate`."""
    return len(re.findall(rf"(?<!\w){re.escape(phrase)}(?!\w)", text, re.IGNORECASE))


def _sentences(text: str) -> list[str]:
    return [part for part in _SENTENCE_BREAK.split(text) if _WORD.search(part)]


def _paragraphs(text: str) -> list[str]:
    return [part for part in _PARAGRAPH_BREAK.split(text) if part.strip()]


# Checkers.


@constraint("word_count", *_RANGE)
def _word_count(response: str, params: Params) -> bool:
    return _in_range(len(_WORD.findall(response)), params)


@constraint("sentence_count", *_RANGE)
def _sentence_count(response: str, params: Params) -> bool:
    return _in_range(len(_sentences(response)), params)


@constraint("paragraph_count", *_RANGE)
def _paragraph_count(response: str, params: Params) -> bool:
    return _in_range(len(_paragraphs(response)), params)


@constraint("include_keywords", "keywords")
def _include_keywords(response: str, params: Params) -> bool:
    return all(_occurrences(keyword, response) for keyword in _texts(params, "keywords"))


@constraint("forbidden_words", "words")
def _forbidden_words(response: str, params: Params) -> bool:
    return not any(_occurrences(word, response) for word in _texts(params, "words"))


@constraint("keyword_frequency", "keyword", *_RANGE)
def _keyword_frequency(response: str, params: Params) -> bool:
    return _in_range(_occurrences(_text(params, "keyword"), response), params)


@constraint("valid_json")
def _valid_json(response: str, params: Params) -> bool:
    """The whole response is one JSON value, bare or as the only thing in a ```json fence; standard
    JSON only (no NaN or Infinity)."""
    text = response.strip()
    fenced = _JSON_FENCE.fullmatch(text)
    try:
        json.loads(fenced.group(1) if fenced else text, parse_constant=_not_json)
    except (ValueError, RecursionError):  # the second: nested deeper than the parser goes
        return False
    return True


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


@constraint("all_uppercase")
def _all_uppercase(response: str, params: Params) -> bool:
    # The second test requires at least one letter: a response of digits alone has no case.
    return response == response.upper() and response != response.lower()


@constraint("all_lowercase")
def _all_lowercase(response: str, params: Params) -> bool:
    return response == response.lower() and response != response.upper()


@constraint("starts_with", "phrase")
def _starts_with(response: str, params: Params) -> bool:
    return response.lstrip().casefold().startswith(_text(params, "phrase").casefold())


@constraint("ends_with", "phrase")
def _ends_with(response: str, params: Params) -> bool:
    return response.rstrip().casefold().endswith(_text(params, "phrase").casefold())


@constraint("no_commas")
def _no_commas(response: str, params: Params) -> bool:
    # The full-width comma counts too, or swapping it in would satisfy the letter of the rule.
    return "," not in response and "，" not in response


@constraint("bullet_count", *_RANGE)
def _bullet_count(response: str, params: Params) -> bool:
    return _in_range(len(_BULLET.findall(response)), params)


@constraint("max_characters", "max")
def _max_characters(response: str, params: Params) -> bool:
    """At most `max` characters, not counting leading and trailing whitespace."""
    limit = _count(params, "max")
    if limit is None:
        raise _InvalidParams("needs 'max'")
    return len(response.strip()) <= limit
