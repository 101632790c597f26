"""`k2rl score`: score a JSONL file of responses offline with any registered reward.

Each input line is an object with `response` plus what the reward needs (`math`:
`answer`; `code`: `tests` or `cases`; `instruction`: `constraints`). Each output line
is the input object plus `reward` and `reward_info` (`reason`, `components`), in
input order. A malformed line scores 0 with its reason; it never stops the file.

A group reward (`rubric`, `judge`) scores groups: each line is a task with a `responses` list, the
prompt (`prompt`, text, or `messages`) and the rest of its reward_spec (for example `rubrics`), and
its output line carries `rewards` and `reward_info` as lists, one entry per response. Such a reward
needs a critic to generate with (`--critic-model DIR` or `--critic-url URL`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from rewards.registry import RewardContext, get_reward, is_blocking_reward, is_group_reward
from rewards.scoring import RewardScorer
from rl.records import EpisodeStatus, RewardResult, Task, Trajectory

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


def _json_object(line: str, number: int) -> tuple[dict, str]:
    """The line's JSON object and "", or a stand-in record and the malformation reason."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return {"line": number, "raw": line}, f"{_MALFORMED}: invalid JSON ({error.msg})"
    if not isinstance(record, dict):
        return {"line": number, "raw": record}, f"{_MALFORMED}: not a JSON object"
    return record, ""


def _parse_line(line: str, number: int, reward: str) -> tuple[dict, Task | None, str]:
    """The record, its task (None if malformed) and either the response or the malformation reason."""
    record, malformed = _json_object(line, number)
    if malformed:
        return record, None, malformed
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


def _parse_group_line(line: str, number: int, reward: str) -> tuple[dict, Task | None, list[str] | str]:
    """The record, its task (None if malformed) and either its responses or the malformation reason."""
    record, malformed = _json_object(line, number)
    if malformed:
        return record, None, malformed
    responses = record.get("responses")
    if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
        return record, None, f"{_MALFORMED}: no 'responses' list of strings"
    messages = record.get("messages") or [{"role": "user", "content": record.get("prompt")}]
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
        return record, None, f"{_MALFORMED}: no 'prompt' string or 'messages' list of chat messages"
    spec = {key: value for key, value in record.items() if key not in ("responses", "prompt", "messages")}
    task = Task(str(record.get("id", number)), tuple(messages), str(record.get("task_type", "offline")), reward, spec)
    return record, task, responses


def score_groups_jsonl(reward: str, input_path: Path, output_path: Path, concurrency: int, critic: RewardContext) -> ScoreSummary:
    """Score every line of `input_path`, a group of responses each, with a group reward and `critic`."""
    lines = [line for line in input_path.read_text().splitlines() if line.strip()]
    parsed = [_parse_group_line(line, number, reward) for number, line in enumerate(lines, start=1)]
    start = time.perf_counter()

    async def score_all() -> list[list[RewardResult]]:
        limit = asyncio.Semaphore(concurrency)
        scorer = RewardScorer(num_workers=0)

        async def one(task: Task | None, responses: list[str] | str) -> list[RewardResult]:
            if task is None:
                return [RewardResult(0.0, responses)]
            group = [Trajectory(task, task.task_id, index, [], response_text=text, status=EpisodeStatus.COMPLETED)
                     for index, text in enumerate(responses)]
            async with limit:
                return await scorer.score_group(group, critic, budget_penalty=0.0)

        return list(await asyncio.gather(*(one(task, responses) for _, task, responses in parsed)))

    summary = ScoreSummary(count=0, mean_reward=0.0)
    total = 0.0
    with output_path.open("w") as out:
        for (record, _, _), results in zip(parsed, asyncio.run(score_all())):
            summary.count += len(results)
            total += sum(result.score for result in results)
            summary.reasons.update(result.reason.split(":")[0] for result in results)
            infos = [{"reason": result.reason, "components": result.components} for result in results]
            out.write(json.dumps({**record, "rewards": [result.score for result in results], "reward_info": infos}) + "\n")
    summary.seconds = time.perf_counter() - start
    summary.mean_reward = total / summary.count if summary.count else 0.0
    return summary


def score_jsonl(reward: str, input_path: Path, output_path: Path, concurrency: int) -> ScoreSummary:
    """Score every line of `input_path` into `output_path` with a per-response reward; returns the summary."""
    if is_group_reward(get_reward(reward)):
        raise ValueError(f"reward {reward!r} scores groups of responses: score it with score_groups_jsonl and a critic")
    lines = [line for line in input_path.read_text().splitlines() if line.strip()]
    parsed = [_parse_line(line, number, reward) for number, line in enumerate(lines, start=1)]
    valid = [(task, text, False) for _, task, text in parsed if task is not None]
    start = time.perf_counter()
    summary = ScoreSummary(count=len(parsed), mean_reward=0.0)
    total = 0.0
    # Rewards that wait (on sandboxes) run in threads, which share one sandbox pool. The others run
    # in worker processes, or with --concurrency 1 here: in parallel, and on a main thread, where
    # math_verify's time limit works. Either way the order is kept.
    blocking = is_blocking_reward(get_reward(reward))
    workers = concurrency if blocking or concurrency > 1 else 0
    with RewardScorer(num_workers=workers, threads=blocking) as scorer, output_path.open("w") as out:
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
