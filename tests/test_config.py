from pathlib import Path

import pytest
import yaml

from rl.cli import main
from rl.config import ConfigError, RunConfig, _flatten, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_default_yaml_is_the_embedded_default():
    assert load_config(ROOT / "configs" / "default.yaml") == RunConfig()


def test_default_yaml_lists_every_key():
    default_yaml = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())

    def listed(key: str) -> bool:
        node = default_yaml
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    assert [key for key in _flatten(RunConfig()) if not listed(key)] == []


def test_overrides_are_typed():
    config = load_config(None, ["trainer.lr=3e-5", "rollout.n_samples=4", "steps=7", "rollout.token_budgets.code=99"])
    assert config.trainer.lr == pytest.approx(3e-5)
    assert config.rollout.n_samples == 4 and config.steps == 7
    assert config.rollout.token_budgets == {"arithmetic": 48, "code": 99}


def test_an_override_below_a_mapping_adds_one_entry():
    config = load_config(None, ["data.columns.reward_spec.tests=test_code", "data.columns.prompt=question", "trainer.lr.end=1e-5"])
    assert config.data.columns == {"reward_spec.tests": "test_code", "prompt": "question"}
    assert config.trainer.lr == {"schedule": "linear", "start": 2e-4, "end": 1e-5, "steps": 150}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.lrr=1"], "unknown key trainer.lrr"),
        (["bogus=1"], "unknown key bogus"),
        (["trainer.lr=fast"], "trainer.lr: 'fast' matches none of float"),
        (["trainer.lr=-1e-4"], "trainer.lr must be >= 0"),
        (["trainer.lr={schedule: linear, start: 1e-4, steps: 10}"], "trainer.lr.end is required for a linear schedule"),
        (["rollout.n_samples=2.5"], "rollout.n_samples must be int"),
        (["trainer=3"], "trainer must be a mapping"),
        (["steps=0"], "steps must be > 0"),
        (["rollout.n_samples=3", "data.prompts_per_step=3", "trainer.data_parallel_size=2"], "does not divide"),
        (["model.path=/no/such/model"], "model.path: /no/such/model does not exist"),
        (["data.train_path=/no/such.jsonl"], "data.train_path: /no/such.jsonl does not exist"),
        (["rollout.token_budgets.math=0"], "rollout.token_budgets.math must be > 0"),
        (["novalue"], "must look like key.sub=value"),
        (["rollout.temperature=0"], "rollout.temperature must be > 0"),
        (["rollout.top_p=0.9"], "rollout.top_p must be 1.0"),
        (["rollout.max_model_len=64"], "rollout.max_model_len=64 leaves no room"),
        (["trainer.tensor_parallel_size=0"], "trainer.tensor_parallel_size must be > 0"),
        (["trainer.qk_clip_threshold=-1"], "trainer.qk_clip_threshold must be >= 0"),
        (["weight_sync.bucket_mb=0"], "weight_sync.bucket_mb must be > 0, got 0"),
        (["weight_sync.timeout_s=-1"], "weight_sync.timeout_s must be > 0"),
        (["checkpoint.bucket_mb=1"], "checkpoint.bucket_mb moved to weight_sync.bucket_mb"),
        (["checkpoint.every=-1"], "checkpoint.every must be >= 0"),
        (["checkpoint.keep=0"], "checkpoint.keep must be > 0"),
        (["reward.max_error_frac=2"], "reward.max_error_frac must be in"),
        (["model.prompt_format=xml"], "model.prompt_format must be auto, chat or plain"),
        (["trainer.loss=reinforce"], "trainer.loss: unknown loss 'reinforce'"),
        (["rollout.temperature={schedule: linear, start: 1.0, end: 0.5, steps: 0}"], "rollout.temperature"),
        (["trainer.ptx.path=/no/such.jsonl"], "trainer.ptx.path: /no/such.jsonl does not exist"),
        (["trainer.data_parallel_strategy=zero3"], "trainer.data_parallel_strategy must be auto, fsdp or replicate"),
        (["trainer.optimizer=sgd"], "trainer.optimizer must be muon or adamw"),
        (["trainer.adam_betas=[0.9, 1.0]"], "trainer.adam_betas must be two numbers in"),
        (["rollout.partial.max_tokens_per_step=-1"], "rollout.partial.max_tokens_per_step must be >= 0"),
        (["rollout.partial.max_episode_tokens_per_step=-2"], "rollout.partial.max_episode_tokens_per_step must be >= 0"),
        (["rollout.max_engine_restarts=-1"], "rollout.max_engine_restarts must be >= 0"),
        (["rollout.cpu_threads=-1"], "rollout.cpu_threads must be >= 0"),
        (["rollout.placement=shared"], "rollout.placement must be disaggregated or colocated"),
        (["rollout.tensor_parallel_size=0"], "rollout.tensor_parallel_size must be > 0"),
        (["rollout.num_engines=0"], "rollout.num_engines must be > 0 or auto, got 0"),
        (["trainer.data_parallel_size=0"], "trainer.data_parallel_size must be > 0 or auto, got 0"),
        (["trainer.data_parallel_size=all"], "trainer.data_parallel_size must be > 0 or auto, got 'all'"),
        (["rollout.num_engines=many"], "rollout.num_engines must be > 0 or auto, got 'many'"),
        (["rollout.enforce_eager=sometimes"], "rollout.enforce_eager must be true, false or auto, got 'sometimes'"),
        (["name=[oops"], "the value is not valid YAML"),
        (["steps.x=1"], "override 'steps.x=1': steps is not a section"),
        (["trainer.max_grad_norm=0"], "trainer.max_grad_norm must be > 0"),
        (["trainer.weight_decay=-0.1"], "trainer.weight_decay must be >= 0"),
        (["reward.num_workers=-3"], "reward.num_workers must be >= 0"),
        (["rollout.engine_start_timeout_s=-1"], "rollout.engine_start_timeout_s must be > 0"),
        (["rollout.temperature=.nan"], "rollout.temperature must be a finite number, got nan"),
        (["weight_sync.bucket_mb=inf"], "weight_sync.bucket_mb must be a finite number, got 'inf'"),
        (["trainer.lr={schedule: linear, start: 1e-4, end: 0, steps: .inf}"], "trainer.lr.steps must be a finite number"),
    ],
)
def test_bad_config_names_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, overrides)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def _run_cli(capsys, *args) -> tuple[int, list[str]]:
    code = main(["train", *args])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, lines


def test_cli_reports_config_errors_in_one_line(capsys, tmp_path):
    code, lines = _run_cli(capsys, "trainer.data_parallel_size=3", f"--run-dir={tmp_path}")
    assert code == 2
    assert lines == [
        "k2rl: error: batch of data.prompts_per_step x rollout.n_samples = 256 trajectories does not divide "
        "into trainer.data_parallel_size x trainer.optimizer_steps_per_batch = 3 equal parts"
    ]


def test_cli_one_sample_per_prompt_with_a_group_relative_loss(capsys, tmp_path):
    code, lines = _run_cli(capsys, "rollout.n_samples=1", "data.prompts_per_step=2", f"--run-dir={tmp_path}")
    assert code == 2
    assert lines == [
        "k2rl: error: rollout.n_samples must be at least 2 with trainer.loss k2: its advantages compare the responses "
        "to one prompt, so a single response per prompt learns nothing"
    ]


def test_cli_missing_model_path(capsys, tmp_path):
    code, lines = _run_cli(capsys, f"model.path={tmp_path}", f"--run-dir={tmp_path / 'run'}")
    assert code == 2
    assert len(lines) == 1 and "model.path" in lines[0] and "no config.json" in lines[0]


def test_cli_unknown_reward(capsys, tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"prompt": "1 + 1?", "answer": "2", "reward": "no_such_reward"}\n')
    code, lines = _run_cli(
        capsys, f"data.train_path={tasks}", f"data.eval_path={tasks}", f"--run-dir={tmp_path / 'run'}"
    )
    assert code == 2
    assert len(lines) == 1 and "unknown reward 'no_such_reward'" in lines[0]


def test_cli_a_held_out_task_its_reward_cannot_score(capsys, tmp_path):
    train, held_out = tmp_path / "train.jsonl", tmp_path / "held_out.jsonl"
    train.write_text('{"prompt": "1 + 1?", "answer": "2"}\n')
    held_out.write_text('{"id": "h1", "prompt": "1 + 2?", "answer": "3"}\n{"id": "h2", "prompt": "1 + 3?", "answer": ""}\n')
    code, lines = _run_cli(
        capsys, f"data.train_path={train}", f"data.eval_path={held_out}", f"--run-dir={tmp_path / 'run'}"
    )
    assert code == 2
    assert lines == ["k2rl: error: task 'h2': cannot parse reward_spec['answer'] ''"]


def test_cli_a_run_directory_that_cannot_be_created(capsys, tmp_path, tiny_policy):
    (tmp_path / "file").write_text("")
    code, lines = _run_cli(capsys, f"model.path={tiny_policy}", f"--run-dir={tmp_path / 'file' / 'run'}")
    assert code == 2
    assert lines == [f"k2rl: error: run directory {tmp_path / 'file' / 'run'}: cannot create it (Not a directory: {tmp_path / 'file' / 'run'})"]


def test_a_curriculum_needs_a_difficulty_on_every_task(tmp_path):
    from rl.loop import Controller

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"id": "easy", "prompt": "1 + 1?", "answer": 2, "difficulty": 1}\n{"id": "plain", "prompt": "2 + 2?", "answer": 4}\n')
    config = load_config(None, [f"data.train_path={tasks}", f"data.eval_path={tasks}", "data.curriculum.steps=10"])
    with pytest.raises(ValueError, match="data.curriculum needs a difficulty for every task; task 'plain' has none"):
        Controller(config, tmp_path / "run")


def test_bootstrap_refuses_a_folder_that_holds_anything_but_a_policy(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["bootstrap", "--out", str(tmp_path)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [f"k2rl: error: {tmp_path} holds files but no bootstrap.json (not a built policy): choose an empty or new folder"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_bootstrap_refuses_a_folder_it_cannot_create_before_training(capsys, tmp_path):
    (tmp_path / "file").write_text("")
    assert main(["bootstrap", "--out", str(tmp_path / "file" / "policies" / "default")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [f"k2rl: error: {tmp_path / 'file' / 'policies' / 'default'}: cannot create its folder "
                     f"(Not a directory: {tmp_path / 'file' / 'policies'})"]
