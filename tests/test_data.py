import pytest

from rl.data import PromptSampler, arithmetic_eval_tasks, load_tasks


def test_jsonl_short_and_full_forms(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text(
        '{"prompt": "What is 2 + 3?", "answer": 5}\n\n'
        '{"id": "x", "messages": [{"role": "user", "content": "hi"}], "task_type": "chat", '
        '"reward": "math", "reward_spec": {"answer": "1"}}\n'
    )
    first, second = load_tasks(path)
    assert first.messages == ({"role": "user", "content": "What is 2 + 3?"},)
    assert first.reward == "math" and first.reward_spec == {"answer": "5"} and first.task_id == "tasks-1"
    assert second.task_id == "x" and second.task_type == "chat"


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text('{"prompt": "ok", "answer": 1}\n{"answer": 2}\n')
    with pytest.raises(ValueError, match=r"tasks\.jsonl:2: bad task line"):
        load_tasks(path)


def test_generated_training_prompts_never_repeat_eval_prompts():
    eval_tasks = arithmetic_eval_tasks(200)
    held_out = {t.messages[0]["content"] for t in eval_tasks}
    sampler = PromptSampler(None, seed=0, eval_tasks=eval_tasks)
    drawn = sampler.sample(3000)
    assert not held_out & {t.messages[0]["content"] for t in drawn}
    assert all(t.reward == "math" and t.reward_spec["answer"].isdigit() for t in drawn)
