"""Task files (rl/data/sources.py): each format, the column mapping, and every bad-input error."""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from rl.config import ConfigError
from rl.data import load_tasks
from rl.records import Task

# Every row has every key, as Arrow gives them: None where a row has no value.
ROWS = [
    {"id": None, "prompt": "What is 2 + 3?", "messages": None, "answer": 5, "task_type": None, "reward": None,
     "reward_spec": None, "env": None, "env_kwargs": None, "difficulty": 0.5},
    {"id": "half", "prompt": None, "answer": 2.5, "task_type": "chat", "reward": None, "reward_spec": None,
     "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Half of 5?"}],
     "env": None, "env_kwargs": None, "difficulty": None},
    {"id": "words", "prompt": "Describe a cat in under ten words.", "messages": None, "answer": None,
     "task_type": "chat", "reward": "instruction",
     "reward_spec": {"constraints": [{"type": "word_count", "max": 10},
                                     {"type": "include_keywords", "keywords": ["cat"]}]},
     "env": None, "env_kwargs": None, "difficulty": None},
    {"id": "p24", "prompt": "Make 24 from 1 2 3 4.", "messages": None, "answer": None, "task_type": None,
     "reward": "puzzle", "reward_spec": {"puzzle": "24", "numbers": [1, 2, 3, 4]}, "env": None,
     "env_kwargs": None, "difficulty": None},
    {"id": "guess", "prompt": None, "messages": None, "answer": None, "task_type": "game", "reward": None,
     "reward_spec": None, "env": "guess-number", "env_kwargs": {"max_value": 50}, "difficulty": None},
]

EXPECTED = [
    Task("tasks-1", ({"role": "user", "content": "What is 2 + 3?"},), "math", "math", {"answer": "5"},
         difficulty=0.5),
    Task("half", ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Half of 5?"}),
         "chat", "math", {"answer": "2.5"}),
    Task("words", ({"role": "user", "content": "Describe a cat in under ten words."},), "chat", "instruction",
         {"constraints": [{"type": "word_count", "max": 10}, {"type": "include_keywords", "keywords": ["cat"]}]}),
    Task("p24", ({"role": "user", "content": "Make 24 from 1 2 3 4."},), "math", "puzzle",
         {"puzzle": "24", "numbers": [1, 2, 3, 4]}),
    Task("guess", (), "game", "", env="guess-number", env_kwargs={"max_value": 50}),
]


def write(path: Path, rows: list[dict]) -> Path:
    """Write rows in the format the path's name asks for, with `datasets` itself."""
    dataset = Dataset.from_list(rows)
    if path.suffix == ".jsonl":
        dataset.to_json(path)
    elif path.suffix == ".parquet":
        dataset.to_parquet(path)
    else:
        dataset.save_to_disk(path)
    return path


@pytest.mark.parametrize("name", ["tasks.jsonl", "tasks.parquet", "tasks"])
def test_every_format_gives_the_same_tasks(tmp_path, name):
    # Arrow fills the keys one row's reward_spec lacks with None and stores the answers 5 and 2.5
    # as floats; the tasks must still be exactly what each row says.
    assert load_tasks(write(tmp_path / name, ROWS)) == EXPECTED


def test_saved_dataset_dict_loads_one_split(tmp_path):
    splits = DatasetDict(train=Dataset.from_list(ROWS[:1]), test=Dataset.from_list(ROWS[1:2]))
    splits.save_to_disk(tmp_path / "math")
    assert [task.task_id for task in load_tasks(tmp_path / "math" / "test")] == ["half"]
    DatasetDict(train=Dataset.from_list(ROWS[1:2])).save_to_disk(tmp_path / "only-train")
    assert [task.task_id for task in load_tasks(tmp_path / "only-train")] == ["half"]


def test_saved_dataset_dict_with_several_splits_names_them(tmp_path):
    DatasetDict(train=Dataset.from_list(ROWS), test=Dataset.from_list(ROWS)).save_to_disk(tmp_path / "math")
    with pytest.raises(ValueError, match=r"math: a dataset with splits train, test; .* such as .*math/train"):
        load_tasks(tmp_path / "math")


def test_columns_map_task_fields_to_other_names(tmp_path):
    rows = [{"question": "Reverse 'ab'.", "solution": "ba", "test_code": "assert f('ab') == 'ba'",
             "prompt": "not the prompt", "task_type": "code", "source": "ignored"}]
    columns = {"prompt": "question", "answer": "solution", "reward_spec.tests": "test_code"}
    (task,) = load_tasks(write(tmp_path / "tasks.parquet", rows), columns)
    # The mapped column wins over the column named like the field; task_type is found by its name.
    assert task == Task("tasks-1", ({"role": "user", "content": "Reverse 'ab'."},), "code", "math",
                        {"answer": "ba", "tests": "assert f('ab') == 'ba'"})


def test_json_lines_columns_may_mix_value_types(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text(
        '{"prompt": "a", "answer": 7}\n'
        '{"prompt": "b", "answer": "x + 1"}\n'
        '{"prompt": "c", "reward_spec": {"answer": 3}}\n'
    )
    assert [task.reward_spec for task in load_tasks(path)] == [{"answer": "7"}, {"answer": "x + 1"}, {"answer": "3"}]


def test_missing_column_names_column_field_file_and_columns(tmp_path):
    path = write(tmp_path / "tasks.parquet", [{"question": "q", "solution": "s"}])
    with pytest.raises(ValueError, match=r"tasks\.parquet: no column 'solutoin' for task field 'answer' "
                                         r"\(data\.columns\); its columns: question, solution"):
        load_tasks(path, {"prompt": "question", "answer": "solutoin"})


def test_file_without_prompt_columns_names_its_columns(tmp_path):
    path = write(tmp_path / "tasks.parquet", [{"question": "q", "answer": "s"}])
    with pytest.raises(ValueError, match=r"tasks\.parquet: no column gives the prompt, messages or env "
                                         r"\(data\.columns maps one\); its columns: question, answer"):
        load_tasks(path)


def test_unknown_task_field_in_columns_is_a_config_error(tmp_path):
    path = write(tmp_path / "tasks.parquet", [{"question": "q"}])
    with pytest.raises(ConfigError, match=r"data\.columns: unknown task field 'promt' \(fields: id, prompt"):
        load_tasks(path, {"promt": "question"})


def test_empty_files_have_no_tasks(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    Dataset.from_dict({"prompt": []}).to_parquet(tmp_path / "empty.parquet")
    for name in ("empty.jsonl", "blank.jsonl", "empty.parquet"):
        with pytest.raises(ValueError, match=rf"{name}: no tasks in file"):
            load_tasks(tmp_path / name)


@pytest.mark.parametrize(("bad_line", "problem"), [
    ('{"prompt": "b"', "malformed JSON line"),
    ("[1, 2]", "expected a JSON object, got list"),
])
def test_unreadable_json_line_names_file_and_line(tmp_path, caplog, bad_line, problem):
    path = tmp_path / "tasks.jsonl"
    path.write_text('{"prompt": "a"}\n\n' + bad_line + '\n{"prompt": "c"}\n')
    with pytest.raises(ValueError, match=rf"tasks\.jsonl:3: {problem}"):
        load_tasks(path)
    # The error is said once: not also by the datasets reader's own log line.
    assert not caplog.records, caplog.text


def test_a_json_lines_file_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_bytes('{"prompt": "a"}\n{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"tasks\.jsonl:2: not UTF-8 text"):
        load_tasks(path)


def test_blank_line_in_a_mixed_type_json_lines_file_is_named(tmp_path):
    """datasets 5.2's JSON reader fails on such a file; once a release reads it, this error can go."""
    path = tmp_path / "tasks.jsonl"
    path.write_text('{"prompt": "a", "answer": 7}\n\n{"prompt": "b", "answer": "x"}\n')
    with pytest.raises(ValueError, match=r"tasks\.jsonl:2: blank line; .* remove them"):
        load_tasks(path)


def test_row_without_prompt_names_file_and_row(tmp_path):
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": None, "answer": "2"}]
    with pytest.raises(ValueError, match=r"tasks\.parquet: row 2: bad task row \(ValueError: the task has no "
                                         r"prompt, messages or env\)"):
        load_tasks(write(tmp_path / "tasks.parquet", rows))
    path = tmp_path / "tasks.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"answer": "2"}\n')
    with pytest.raises(ValueError, match=r"tasks\.jsonl:3: bad task line"):
        load_tasks(path)


def test_reward_spec_that_is_not_an_object_names_the_row(tmp_path):
    rows = [{"prompt": "a", "reward_spec": '{"answer": "1"}'}]
    with pytest.raises(ValueError, match=r"row 1: bad task row \(TypeError: reward_spec must be an object, got str"):
        load_tasks(write(tmp_path / "tasks.parquet", rows))


@pytest.mark.parametrize(("line", "problem"), [
    ('{"messages": "hi"}', 'messages must be a list of {"role": ..., "content": ...} objects, got str \'hi\''),
    ('{"messages": [{"role": "user"}]}', "messages must be a list of .* objects, got the message {'role': 'user'}"),
    ('{"prompt": "a", "difficulty": "hard"}', "difficulty must be a number, got str 'hard'"),
])
def test_a_malformed_field_is_named_with_its_line(tmp_path, line, problem):
    path = tmp_path / "tasks.jsonl"
    path.write_text('{"prompt": "a"}\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"tasks\.jsonl:2: bad task line \(TypeError: {problem}\)"):
        load_tasks(path)


def test_unsupported_paths_name_the_formats(tmp_path, caplog):
    (tmp_path / "tasks.csv").write_text("prompt,answer\na,1\n")
    (tmp_path / "not-a-dataset").mkdir()
    (tmp_path / "broken.parquet").write_text("not parquet")
    for shard in write(tmp_path / "broken", ROWS).glob("*.arrow"):
        shard.write_text("not arrow")
    for name, problem in [("tasks.csv", "unknown task file format; expected JSON Lines"),
                          ("not-a-dataset", "not a task file .*; expected JSON Lines"),
                          ("broken.parquet", "cannot read as Parquet"),
                          ("broken", "cannot read as a saved Hugging Face dataset")]:
        with pytest.raises(ValueError, match=rf"{name}: {problem}"):
            load_tasks(tmp_path / name)
        assert not caplog.records, caplog.text
