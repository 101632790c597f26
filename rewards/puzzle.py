"""The `puzzle` reward and its task generators: logic puzzles with exactly checkable answers.

Puzzles suit RL because checking an answer is cheap and exact while finding one
takes search, and a generator makes unlimited fresh instances that no pre-training
corpus has leaked. `reward_spec["puzzle"]` selects the verifier:

- `"24"`: combine the four `numbers`, each used once, with + - * / and
  parentheses into exactly 24. Answers are parsed with `ast` and evaluated
  with `Fraction`; nothing in a response is ever executed.
- `"cryptarithm"`: give a letter-to-digit mapping under which `equation`
  (such as `SEND+MORE=MONEY`) is a true sum. Any valid mapping scores, so a
  puzzle with several solutions is still scored exactly.

The verifiers judge the final answer only: the content of the last `\\boxed{...}`,
or failing that the last line that looks like an answer. Generated tasks carry
`reward_spec["solution"]`, one known answer for reference; the verifiers ignore it.
"""

from __future__ import annotations

import ast
import itertools
import operator
import random
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from fractions import Fraction

from rewards.registry import register
from rl.records import RewardResult, Task

PUZZLE_TASK_TYPE = "puzzle"

TARGET = 24

_OPERATORS: dict[type[ast.operator], Callable[[Fraction, Fraction], Fraction]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}

# LaTeX and typographic spellings of the four operations, mapped to ASCII.
_SYMBOLS = {
    "\\left": "",
    "\\right": "",
    "\\times": "*",
    "\\cdot": "*",
    "×": "*",
    "·": "*",
    "\\div": "/",
    "÷": "/",
    "−": "-",
    "–": "-",
    "$": "",
}

# Only digits, spaces, the four operators and parentheses may reach the parser, so
# names, calls, attributes and strings are refused before any parsing happens.
_EXPRESSION = re.compile(r"[0-9\s+\-*/()]+")
# A 24-game answer is a dozen characters; the cap also keeps the tree shallow
# enough to walk recursively and rules out huge integer literals.
_MAX_EXPRESSION_LENGTH = 200

# `S=9`, `s: 9`, or a JSON pair `"S": 9`; the letter must stand alone, so
# `SEND=9567` is not read as `D=9567`.
_ASSIGNMENT = re.compile(r"""(?<![A-Za-z])([A-Za-z])(?![A-Za-z])["']?\s*[:=]\s*["']?(\d+)""")
_EQUATION = re.compile(r"[A-Z]+(?:\+[A-Z]+)+=[A-Z]+")


@register("puzzle")
def puzzle_reward(task: Task, response: str) -> RewardResult:
    """Score the response with the verifier that `reward_spec["puzzle"]` names."""
    kind = task.reward_spec.get("puzzle")
    verifier = _VERIFIERS.get(kind) if isinstance(kind, str) else None
    if verifier is None:
        raise ValueError(
            f"task {task.task_id!r}: reward_spec['puzzle'] must be one of "
            f"{', '.join(sorted(_VERIFIERS))}, got {kind!r}"
        )
    return verifier(task, response)


def _last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}`, braces balanced; None if there is none or it is unclosed."""
    starts = [match.end() for match in re.finditer(r"\\boxed\s*\{", text)]
    if not starts:
        return None
    depth = 0
    for position in range(starts[-1], len(text)):
        if text[position] == "{":
            depth += 1
        elif text[position] == "}":
            if depth == 0:
                return text[starts[-1] : position]
            depth -= 1
    return None


# The 24 game.


def _verify_24(task: Task, response: str) -> RewardResult:
    numbers = _24_numbers(task)
    answer = _24_answer(response)
    if answer is None:
        return RewardResult(0.0, "no_answer")
    tree = _parse_arithmetic(answer)
    if tree is None:
        return RewardResult(0.0, "invalid_expression")
    if Counter(_literals(tree)) != Counter(numbers):
        return RewardResult(0.0, "wrong_numbers")
    try:
        value = _evaluate(tree)
    except ZeroDivisionError:
        return RewardResult(0.0, "division_by_zero")
    return RewardResult(1.0, "correct") if value == TARGET else RewardResult(0.0, "not_24")


def _24_numbers(task: Task) -> list[int]:
    numbers = task.reward_spec.get("numbers")
    if (
        not isinstance(numbers, list)
        or len(numbers) != 4
        or not all(type(n) is int and n >= 0 for n in numbers)
    ):
        raise ValueError(
            f"task {task.task_id!r}: reward_spec['numbers'] must be a list of 4 non-negative "
            f"integers, got {numbers!r}"
        )
    return numbers


def _normalise(text: str) -> str:
    for symbol, replacement in _SYMBOLS.items():
        text = text.replace(symbol, replacement)
    return text


def _24_answer(response: str) -> str | None:
    """The expression to judge: the last boxed one, else one from the last line with arithmetic.

    A boxed answer is taken whole, less a `= 24` on either side, so anything
    else inside the box makes it invalid. Without a box the answer is the
    longest arithmetic stretch of the last line that has digits and an operator,
    which reads `So (8-4)*(3+3) = 24.` as `(8-4)*(3+3)`.
    """
    boxed = _last_boxed(response)
    if boxed is not None:
        text = _normalise(boxed).strip()
        sides = [side.strip() for side in text.split("=")]
        expressions = [side for side in sides if side != str(TARGET)]
        return expressions[0] if len(sides) == 2 and len(expressions) == 1 else text
    for line in reversed(_normalise(response).splitlines()):
        stretches = [
            stretch.strip()
            for stretch in _EXPRESSION.findall(line)
            if re.search(r"[0-9]", stretch) and re.search(r"[+\-*/]", stretch)
        ]
        if stretches:
            return max(stretches, key=len)
    return None


def _parse_arithmetic(text: str) -> ast.expr | None:
    """`text` as a tree of + - * / over integer literals, or None if it is anything else.

    The character check keeps out everything but arithmetic; the tree check then
    refuses what those characters can still spell but the game does not allow:
    `**`, `//` and unary signs (every operation combines two numbers).
    """
    if len(text) > _MAX_EXPRESSION_LENGTH or not _EXPRESSION.fullmatch(text):
        return None
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        return None
    return tree if _is_arithmetic(tree) else None


def _is_arithmetic(node: ast.expr) -> bool:
    if isinstance(node, ast.BinOp):
        return type(node.op) in _OPERATORS and _is_arithmetic(node.left) and _is_arithmetic(node.right)
    return isinstance(node, ast.Constant) and type(node.value) is int


def _literals(node: ast.expr) -> list[int]:
    if isinstance(node, ast.BinOp):
        return _literals(node.left) + _literals(node.right)
    return [node.value]


def _evaluate(node: ast.expr) -> Fraction:
    """Exact value of a tree that `_is_arithmetic` accepted; raises ZeroDivisionError."""
    if isinstance(node, ast.BinOp):
        return _OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    return Fraction(node.value)


def solve_24(numbers: Sequence[int]) -> str | None:
    """An expression that uses each of `numbers` once and equals 24 exactly, or None if none exists.

    Exhaustive search: repeatedly replace two of the remaining values by one of
    their combinations. Fractions keep it exact, so `8/(3-8/3)` is found.
    """
    return _solve([(Fraction(n), str(n)) for n in numbers])


def _solve(items: list[tuple[Fraction, str]]) -> str | None:
    if len(items) == 1:
        value, expression = items[0]
        return expression if value == TARGET else None
    for i, j in itertools.combinations(range(len(items)), 2):
        (a, a_text), (b, b_text) = items[i], items[j]
        a_text, b_text = _grouped(a_text), _grouped(b_text)
        rest = [item for k, item in enumerate(items) if k not in (i, j)]
        combinations = [
            (a + b, f"{a_text}+{b_text}"),
            (a * b, f"{a_text}*{b_text}"),
            (a - b, f"{a_text}-{b_text}"),
            (b - a, f"{b_text}-{a_text}"),
        ]
        if b:
            combinations.append((a / b, f"{a_text}/{b_text}"))
        if a:
            combinations.append((b / a, f"{b_text}/{a_text}"))
        for combination in combinations:
            found = _solve([*rest, combination])
            if found is not None:
                return found
    return None


def _grouped(expression: str) -> str:
    return expression if expression.isdigit() else f"({expression})"


def generate_24_game(rng: random.Random) -> Task:
    """A solvable 24-game task over four card values (1 to 13), redrawn until solvable."""
    while True:
        numbers = [rng.randint(1, 13) for _ in range(4)]
        solution = solve_24(numbers)
        if solution is not None:
            break
    listed = ", ".join(map(str, numbers))
    prompt = (
        f"Use the numbers {listed} to make 24. Use each number exactly once and combine them "
        "with +, -, *, / and parentheses only: no other operations, no negative signs, and no "
        "joining digits into new numbers. Put only the final expression in \\boxed{}, for "
        "example \\boxed{(1+2)*(3+5)} for the numbers 1, 2, 3, 5."
    )
    return Task(
        task_id=f"24-{'-'.join(map(str, numbers))}",
        messages=({"role": "user", "content": prompt},),
        task_type=PUZZLE_TASK_TYPE,
        reward="puzzle",
        reward_spec={"puzzle": "24", "numbers": numbers, "solution": solution},
    )


# Cryptarithms.


def _verify_cryptarithm(task: Task, response: str) -> RewardResult:
    addends, total = _cryptarithm_equation(task)
    words = [*addends, total]
    letters = set("".join(words))
    answer = _last_boxed(response)
    if answer is None:
        answer = next((line for line in reversed(response.splitlines()) if _ASSIGNMENT.search(line)), "")
    pairs = _ASSIGNMENT.findall(answer)
    if not pairs:
        return RewardResult(0.0, "no_answer")

    mapping: dict[str, int] = {}
    for letter, digit in pairs:
        letter = letter.upper()
        if len(digit) != 1 or mapping.setdefault(letter, int(digit)) != int(digit):
            return RewardResult(0.0, "invalid_answer")
    if mapping.keys() - letters:
        return RewardResult(0.0, "unknown_letters")
    if letters - mapping.keys():
        return RewardResult(0.0, "missing_letters")
    if len(set(mapping.values())) != len(mapping):
        return RewardResult(0.0, "repeated_digit")
    if any(len(word) > 1 and mapping[word[0]] == 0 for word in words):
        return RewardResult(0.0, "leading_zero")
    if sum(_word_value(word, mapping) for word in addends) != _word_value(total, mapping):
        return RewardResult(0.0, "wrong_sum")
    return RewardResult(1.0, "correct")


def _cryptarithm_equation(task: Task) -> tuple[list[str], str]:
    """`reward_spec["equation"]` as (addend words, sum word)."""
    equation = task.reward_spec.get("equation")
    text = re.sub(r"\s+", "", equation).upper() if isinstance(equation, str) else ""
    if not _EQUATION.fullmatch(text) or len(set(text) - set("+=")) > 10:
        raise ValueError(
            f"task {task.task_id!r}: reward_spec['equation'] must be a sum of words such as "
            f"'SEND+MORE=MONEY' with at most 10 distinct letters, got {equation!r}"
        )
    left, total = text.split("=")
    return left.split("+"), total


def _word_value(word: str, mapping: dict[str, int]) -> int:
    return int("".join(str(mapping[letter]) for letter in word))


def generate_cryptarithm(rng: random.Random) -> Task:
    """A cryptarithm made by spelling out a true random sum, so that sum is one known solution.

    The addends have 2 to 4 digits, and each digit is replaced by its own random
    letter. Some instances have more than one solution; the verifier accepts any.
    """
    lengths = (rng.randint(2, 4), rng.randint(2, 4))
    addends = [rng.randint(10 ** (length - 1), 10**length - 1) for length in lengths]
    numbers = [*addends, sum(addends)]
    digits = sorted(set("".join(map(str, numbers))))
    letter_of = dict(zip(digits, rng.sample(string.ascii_uppercase, len(digits))))
    words = ["".join(letter_of[digit] for digit in str(number)) for number in numbers]
    equation = f"{'+'.join(words[:-1])}={words[-1]}"
    prompt = (
        f"Solve the cryptarithm {equation}. Each letter stands for a digit from 0 to 9; "
        "different letters stand for different digits, and no word of two or more letters "
        "starts with 0. Find digits that make the sum true, and give every letter's digit in "
        "\\boxed{}, for example \\boxed{A=1, B=2, C=3}."
    )
    return Task(
        task_id=f"cryptarithm-{equation}",
        messages=({"role": "user", "content": prompt},),
        task_type=PUZZLE_TASK_TYPE,
        reward="puzzle",
        reward_spec={
            "puzzle": "cryptarithm",
            "equation": equation,
            "solution": {letter: int(digit) for digit, letter in letter_of.items()},
        },
    )


_VERIFIERS: dict[str, Callable[[Task, str], RewardResult]] = {
    "24": _verify_24,
    "cryptarithm": _verify_cryptarithm,
}
