"""`guess-number`: a multi-turn game, the smallest environment whose episodes need several turns.

The environment thinks of a whole number in [1, max_value] (chosen by the reset seed) and the policy
guesses; each reply's last integer is its guess, answered "Higher." or "Lower." as a user message.
The right guess ends the episode with reward 1.0. A reply without an integer gets a hint and still
counts as a turn, so the turn limit (rollout.max_turns) bounds every episode. The task's messages
are not used: the game supplies its own prompt.

    task = Task("g1", (), "game", reward="", env="guess-number", env_kwargs={"max_value": 50})
"""

from __future__ import annotations

import random
import re

from rl.records import Task
from rollout.environments.base import Environment, ResetResult, StepResult

_INTEGER = re.compile(r"-?\d+")


class GuessNumber(Environment):
    # Async although it does no I/O: it is cheap and cannot hang, so it runs in the driver's
    # event loop instead of an environment worker.

    def __init__(self, max_value: int = 100):
        if not isinstance(max_value, int) or max_value < 1:
            raise ValueError(f"max_value must be a whole number >= 1, got {max_value!r}")
        self.max_value = max_value
        self.secret = 0

    async def reset(self, task: Task, seed: int) -> ResetResult:
        self.secret = random.Random(seed).randint(1, self.max_value)
        prompt = (
            f"I am thinking of a whole number between 1 and {self.max_value}. Guess it: reply with one number, "
            "and I will tell you whether my number is higher or lower."
        )
        return [{"role": "user", "content": prompt}], {"max_value": self.max_value}

    async def step(self, action: str) -> StepResult:
        numbers = _INTEGER.findall(action)
        if not numbers:
            hint = f"Reply with a whole number between 1 and {self.max_value}."
            return [{"role": "user", "content": hint}], 0.0, False, False, {"guess": None}
        guess = int(numbers[-1])
        if guess == self.secret:
            return [], 1.0, True, False, {"guess": guess}
        answer = "Higher." if self.secret > guess else "Lower."
        return [{"role": "user", "content": answer}], 0.0, False, False, {"guess": guess}
