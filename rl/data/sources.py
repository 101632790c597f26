"""Task files: where `data.train_path` and `data.eval_path` point.

Three formats load as they are, through the Hugging Face `datasets` library:

    tasks.jsonl, tasks.json   JSON Lines, one task object per line
    tasks.parquet             a Parquet file, one task per row
    a directory               a saved Hugging Face dataset, as `Dataset.save_to_disk` writes it.
                              `DatasetDict.save_to_disk` writes one such dataset per split, in a
                              directory named after the split: point the path at that directory
                              (`gsm8k/train`, `gsm8k/test`). A DatasetDict directory with a single
                              split loads that split; with several it is an error that names them.

JSON Lines and Parquet files are converted to Arrow once, into the `datasets` cache
(HF_DATASETS_CACHE, ~/.cache/huggingface/datasets by default); later runs reuse the copy until
the file changes.

A task is one row. Its fields:

    id           the task's name in logs; default `<file stem>-<row number>`
    prompt       the user message, as text
    messages     the whole prompt as chat messages ([{"role": ..., "content": ...}]); wins over prompt
    answer       the reference answer; stored as the string reward_spec["answer"]
    task_type    selects the response token budget (rollout.token_budgets); default "math"
    reward       the registered reward that scores the final answer; default "math", or "" (the
                 sum of the environment's step rewards) when the row names an env
    reward_spec  an object with whatever else the reward needs
    env          a registered multi-turn environment; such a row needs no prompt
    env_kwargs   an object passed to the environment
    difficulty   a number, easy (low) to hard (high), for curriculum sampling

A row needs a prompt, messages or an env. The shortest JSON Lines file is

    {"prompt": "What is 2 + 3?", "answer": 5}

and a row in full reads

    {"id": "t1", "messages": [{"role": "user", "content": "..."}], "task_type": "math",
     "reward": "math", "reward_spec": {"answer": "5"}}

Columns. A column named like a field fills that field; other columns are ignored. When the
file's columns have other names, `data.columns` maps field to column, for example

    data:
      columns: {prompt: question, answer: solution, reward_spec.tests: test_code}

where `reward_spec.<key>` puts a column into reward_spec under <key> (here the `tests` that the
code reward reads). A mapped column the file lacks is an error that lists the columns it has.

Empty values (null in JSON, None in Arrow) count as absent, also inside reward_spec and
env_kwargs: Arrow gives every row of an object column the keys of all rows, and the rewards
would otherwise see keys the row never had. reward_spec["answer"] is always a string: a
whole-number float such as 5.0 becomes "5", since Arrow stores a column that mixes 5 and 2.5 as
floats.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow
import pyarrow.parquet
from datasets import Dataset, DatasetDict, disable_progress_bars, load_dataset, load_from_disk
from datasets.utils import logging as datasets_logging

from rl.config import ConfigError
from rl.records import Task

TASK_FIELDS = (
    "id", "prompt", "messages", "answer", "task_type", "reward", "reward_spec", "env", "env_kwargs", "difficulty",
)
# A `data.columns` key with this prefix names a reward_spec entry rather than a task field.
REWARD_SPEC_PREFIX = "reward_spec."
JSON_LINES_SUFFIXES = (".jsonl", ".json")
FORMATS = "JSON Lines (.jsonl, .json), Parquet (.parquet) or a saved Hugging Face dataset directory"


def load_tasks(path: str | Path, columns: Mapping[str, str] | None = None) -> list[Task]:
    """Read every task of a task file; `columns` maps task fields to the file's columns."""
    path = Path(path)
    columns = columns or {}
    _check_task_fields(columns)
    rows = _read_rows(path)
    if not len(rows):
        raise ValueError(f"{path}: no tasks in file")
    column_of_field = _column_of_field(path, rows.column_names, columns)
    # One conversion of the whole table: reading a Dataset row by row is 20x slower.
    try:
        rows = rows.select_columns(sorted(set(column_of_field.values()))).to_list()
    except UnicodeDecodeError as error:  # Arrow's JSON reader takes bytes that are not UTF-8 as they are
        problem = _json_lines_problem(path, error) if path.suffix in JSON_LINES_SUFFIXES else f"{path}: text that is not UTF-8 ({error.reason})"
        raise ValueError(problem) from None
    tasks = []
    for index, row in enumerate(rows):
        record = {name: row[column] for name, column in column_of_field.items()}
        try:
            tasks.append(task_from_record(record, default_id=f"{path.stem}-{index + 1}"))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(_bad_row_message(path, index, error)) from None
    return tasks


def task_from_record(record: Mapping[str, Any], default_id: str) -> Task:
    """One task from a mapping of task fields (see the module docstring); None means absent."""
    present = {name: value for name, value in record.items() if value is not None}
    env = str(present.get("env", ""))
    if "messages" in present:
        messages = _messages(present["messages"])
    elif "prompt" in present:
        messages = ({"role": "user", "content": str(present["prompt"])},)
    elif env:
        messages = ()
    else:
        raise ValueError("the task has no prompt, messages or env")
    reward_spec = _object_field(present, "reward_spec")
    reward_spec.update(
        {name.removeprefix(REWARD_SPEC_PREFIX): _without_nulls(value)
         for name, value in present.items() if name.startswith(REWARD_SPEC_PREFIX)}
    )
    if "answer" in present:
        reward_spec["answer"] = present["answer"]
    if "answer" in reward_spec:
        reward_spec["answer"] = _answer_text(reward_spec["answer"])
    return Task(
        task_id=str(present.get("id", default_id)),
        messages=messages,
        task_type=str(present.get("task_type", "math")),
        reward=str(present.get("reward", "" if env else "math")),
        reward_spec=reward_spec,
        env=env,
        env_kwargs=_object_field(present, "env_kwargs"),
        difficulty=_number_field(present, "difficulty") if "difficulty" in present else None,
    )


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    shape = 'a list of {"role": ..., "content": ...} objects'
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"messages must be {shape}, got {type(value).__name__} {value!r:.80}")
    for message in value:
        if not isinstance(message, Mapping) or not {"role", "content"} <= message.keys():
            raise TypeError(f"messages must be {shape}, got the message {message!r:.80}")
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def _number_field(present: Mapping[str, Any], name: str) -> float:
    value = present[name]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r:.80}") from None


def _read_rows(path: Path) -> Dataset:
    # Loading a task file is one step of starting a run: no progress bars of its own.
    disable_progress_bars()
    with _failures_not_logged():
        return _read_by_format(path)


@contextlib.contextmanager
def _failures_not_logged() -> Iterator[None]:
    """datasets' readers log why a file failed them before they raise; the error raised here says
    it once, with the file's line where it can."""
    verbosity = datasets_logging.get_verbosity()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)
    try:
        yield
    finally:
        datasets_logging.set_verbosity(verbosity)


def _read_by_format(path: Path) -> Dataset:
    if path.is_dir():
        return _read_saved_dataset(path)
    if path.suffix in JSON_LINES_SUFFIXES:
        return _read_json_lines(path)
    if path.suffix == ".parquet":
        try:
            return load_dataset("parquet", data_files=str(path.resolve()), split="train")
        except Exception as error:  # the reader raises Arrow, OS and datasets errors alike
            raise ValueError(_parquet_problem(path, error)) from None
    raise ValueError(f"{path}: unknown task file format; expected {FORMATS}")


def _read_saved_dataset(path: Path) -> Dataset:
    try:
        saved = load_from_disk(str(path))
    except FileNotFoundError as error:
        raise ValueError(f"{path}: not a task file ({error}); expected {FORMATS}") from None
    except Exception as error:  # a damaged directory fails anywhere in Arrow or datasets
        raise ValueError(f"{path}: cannot read as a saved Hugging Face dataset ({_cause(error)})") from None
    if not isinstance(saved, DatasetDict):
        return saved
    if len(saved) != 1:
        splits = ", ".join(saved) or "none"
        raise ValueError(
            f"{path}: a dataset with splits {splits}; point the path at one split's directory, "
            f"such as {path / next(iter(saved), 'train')}"
        )
    (split,) = saved.values()
    return split


def _read_json_lines(path: Path) -> Dataset:
    try:
        return load_dataset("json", data_files=str(path.resolve()), split="train")
    except Exception as error:  # the reader raises Arrow, JSON, OS and datasets errors alike
        raise ValueError(_json_lines_problem(path, error)) from None


def _parquet_problem(path: Path, error: Exception) -> str:
    """Why the Parquet reader failed: a file without rows fails it too, with a message about splits."""
    try:
        rows = pyarrow.parquet.read_metadata(path).num_rows
    except pyarrow.ArrowInvalid:
        rows = None
    if rows == 0:
        return f"{path}: no tasks in file"
    return f"{path}: cannot read as Parquet ({_cause(error)})"


def _json_lines_problem(path: Path, error: Exception) -> str:
    """Why the JSON reader failed, naming the line: its own errors give no line or only a block's row."""
    first_blank_line = task_lines = 0
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as decode_error:
        line = path.read_bytes()[: decode_error.start].count(b"\n") + 1
        return f"{path}:{line}: not UTF-8 text ({decode_error.reason} at byte {decode_error.start})"
    for number, line in enumerate(io.StringIO(text), start=1):
        if not line.strip():
            first_blank_line = first_blank_line or number
            continue
        task_lines += 1
        try:
            value = json.loads(line)
        except json.JSONDecodeError as decode_error:
            return f"{path}:{number}: malformed JSON line ({decode_error})"
        if not isinstance(value, dict):
            return f"{path}:{number}: expected a JSON object, got {type(value).__name__}"
    if not task_lines:
        return f"{path}: no tasks in file"
    if first_blank_line:
        return (
            f"{path}:{first_blank_line}: blank line; the datasets JSON reader fails on blank lines in files "
            f"whose columns mix value types, remove them ({_cause(error)})"
        )
    return f"{path}: cannot read as JSON Lines ({_cause(error)})"


def _check_task_fields(columns: Mapping[str, str]) -> None:
    for name in columns:
        if name not in TASK_FIELDS and not (name.startswith(REWARD_SPEC_PREFIX) and name != REWARD_SPEC_PREFIX):
            raise ConfigError(
                f"data.columns: unknown task field {name!r} (fields: {', '.join(TASK_FIELDS)}, "
                f"or {REWARD_SPEC_PREFIX}<key> for a reward_spec entry)"
            )


def _column_of_field(path: Path, file_columns: list[str], columns: Mapping[str, str]) -> dict[str, str]:
    """Task field -> the file's column: the mapped column, else the column named like the field."""
    for name, column in columns.items():
        if column not in file_columns:
            raise ValueError(
                f"{path}: no column {column!r} for task field {name!r} (data.columns); "
                f"its columns: {', '.join(file_columns)}"
            )
    column_of_field = {name: name for name in TASK_FIELDS if name in file_columns} | dict(columns)
    if not column_of_field.keys() & {"prompt", "messages", "env"}:
        raise ValueError(
            f"{path}: no column gives the prompt, messages or env (data.columns maps one); "
            f"its columns: {', '.join(file_columns)}"
        )
    return column_of_field


def _bad_row_message(path: Path, index: int, error: Exception) -> str:
    """Name row `index` (from 0) as its author would look for it: by its line in a JSON Lines file."""
    reason = f"{type(error).__name__}: {error}"
    line_number = None
    if path.suffix in JSON_LINES_SUFFIXES:
        with path.open(encoding="utf-8") as lines:
            task_lines = (number for number, line in enumerate(lines, start=1) if line.strip())
            line_number = next(itertools.islice(task_lines, index, None), None)
    if line_number is None:
        return f"{path}: row {index + 1}: bad task row ({reason})"
    return f"{path}:{line_number}: bad task line ({reason})"


def _object_field(present: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = present.get(name, {})
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be an object, got {type(value).__name__} {value!r:.80}")
    return _without_nulls(dict(value))


def _without_nulls(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def _answer_text(answer: Any) -> str:
    if isinstance(answer, float) and answer.is_integer():
        return str(int(answer))
    return str(answer)


def _cause(error: Exception) -> str:
    """The reader's own message: datasets wraps it in a generic one."""
    cause = error.__cause__ or error
    return f"{type(cause).__name__}: {cause}"
