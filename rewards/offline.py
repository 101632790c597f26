"""`k2rl score`: score a JSONL file of responses offline with any registered reward.

Each input line is an object with `response` plus what the reward needs (`math`:
`answer`; `code`: `tests` or `cases`; `instruction`: `constraints`). Each output line
is the input object plus `reward` and `reward_info` (`reason`, `components`), in
input order. A malformed line scores 0 with its reason; it never stops the file.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from rewards.registry import get_reward
from rewards.scoring import RewardScorer
from rl.records import RewardResult, Task

# Lines that fail before any reward runs are scored by this stand-in.
_MALFORMED = "malformed_line"


@dataclass
class ScoreSummary:
    count: int
    mean_reward: float
    reasons: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def runs_per_second(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    def describe(self) -> str:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in self.reasons.most_common())
        return (
            f"{self.count} responses, mean reward {self.mean_reward:.4f}, "
            f"{self.runs_per_second:.1f} per second; reasons: {reasons or 'none'}"
        )


def _parse_line(line: str, number: int, reward: str) -> tuple[dict, Task | None, str]:
    """The record, its task (None if malformed) and either the response or the malformation reason."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return {"line": number, "raw": line}, None, f"{_MALFORMED}: invalid JSON ({error.msg})"
    if not isinstance(record, dict):
        return {"line": number, "raw": record}, None, f"{_MALFORMED}: not a JSON object"
    response = record.get("response")
    if not isinstance(response, str):
        return record, None, f"{_MALFORMED}: no 'response' string"
    spec = {key: value for key, value in record.items() if key != "response"}
    task = Task(
        task_id=str(record.get("id", number)),
        messages=(),
        task_type=str(record.get("task_type", "offline")),
        reward=reward,
        reward_spec=spec,
    )
    return record, task, response


def score_jsonl(reward: str, input_path: Path, output_path: Path, concurrency: int) -> ScoreSummary:
    """Score every line of `input_path` into `output_path`; returns the summary."""
    get_reward(reward)
    lines = [line for line in input_path.read_text().splitlines() if line.strip()]
    parsed = [_parse_line(line, number, reward) for number, line in enumerate(lines, start=1)]
    valid = [(task, text, False) for _, task, text in parsed if task is not None]
    start = time.perf_counter()
    summary = ScoreSummary(count=len(parsed), mean_reward=0.0)
    total = 0.0
    # Threads: rewards that wait on sandboxes share one pool, and the order is kept.
    with RewardScorer(num_workers=concurrency, threads=True) as scorer, output_path.open("w") as out:
        scored = scorer.score_iter(valid, budget_penalty=0.0)
        for record, task, text in tqdm(parsed, desc=f"k2rl score ({reward})", unit="response"):
            result = next(scored) if task is not None else RewardResult(0.0, text)
            total += result.score
            summary.reasons[result.reason.split(":")[0]] += 1
            info = {"reason": result.reason, "components": result.components}
            out.write(json.dumps({**record, "reward": result.score, "reward_info": info}) + "\n")
    summary.seconds = time.perf_counter() - start
    summary.mean_reward = total / len(parsed) if parsed else 0.0
    return summary
