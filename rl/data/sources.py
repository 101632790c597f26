"""Task files: one task per line (JSONL).

A line looks like
    {"prompt": "What is 2 + 3?", "answer": "5"}
or, in full,
    {"id": "t1", "messages": [{"role": "user", "content": "..."}], "task_type": "math",
     "reward": "math", "reward_spec": {"answer": "5"}}
"""

from __future__ import annotations

import json
from pathlib import Path

from rl.records import Task


def load_tasks(path: str | Path, columns: dict[str, str] | None = None) -> list[Task]:
    """Read tasks from JSONL; a malformed line raises one error naming the file and line."""
    path = Path(path)
    tasks = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            tasks.append(task_from_record(json.loads(line), default_id=f"{path.stem}-{number}"))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}:{number}: bad task line ({type(error).__name__}: {error})") from None
    if not tasks:
        raise ValueError(f"{path}: no tasks in file")
    return tasks


def task_from_record(record: dict, default_id: str) -> Task:
    if "messages" in record:
        messages = tuple({"role": m["role"], "content": m["content"]} for m in record["messages"])
    elif "env" in record and "prompt" not in record:
        messages = ()
    else:
        messages = ({"role": "user", "content": record["prompt"]},)
    reward_spec = dict(record.get("reward_spec", {}))
    if "answer" in record:
        reward_spec["answer"] = str(record["answer"])
    return Task(
        task_id=str(record.get("id", default_id)),
        messages=messages,
        task_type=str(record.get("task_type", "math")),
        reward=str(record.get("reward", "" if "env" in record else "math")),
        reward_spec=reward_spec,
        env=str(record.get("env", "")),
        env_kwargs=dict(record.get("env_kwargs", {})),
        difficulty=float(record["difficulty"]) if record.get("difficulty") is not None else None,
    )
