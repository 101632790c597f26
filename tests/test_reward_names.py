"""Every built-in reward is reachable by name from a fresh process: the registry, `k2rl score`, and
the scorer's worker processes (which import nothing but the `rewards` package)."""

import json
import subprocess
import sys

BUILT_IN = ("code", "instruction", "math", "puzzle")


def _fresh(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_a_fresh_process_finds_every_built_in_reward():
    names = json.loads(_fresh("import json, rewards; print(json.dumps(rewards.reward_names()))"))
    assert set(BUILT_IN) <= set(names)


def test_scorer_worker_processes_find_every_built_in_reward():
    code = (
        "from rewards import RewardScorer\n"
        "from rl.records import Task\n"
        f"names = {BUILT_IN!r}\n"
        "tasks = [(Task('t', (), 'x', name, {}), 'response', False) for name in names]\n"
        "with RewardScorer(num_workers=1) as scorer:\n"
        "    for name, result in zip(names, scorer.score(tasks, 0.0)):\n"
        "        print(name, result.reason.split(':')[0])\n"
    )
    lines = dict(line.split() for line in _fresh(code).splitlines())
    # Each reward ran in the worker: a task without its fields reaches the reward (and fails there),
    # where an unknown name would have failed the whole call.
    assert set(lines) == set(BUILT_IN)


def test_k2rl_score_accepts_every_built_in_reward(tmp_path):
    """`k2rl score --reward NAME` for each name, in one fresh process."""
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"response": "42"}) + "\n")
    code = (
        "from rl.cli import main\n"
        f"for name in {BUILT_IN!r}:\n"
        f"    code = main(['score', '--reward', name, '--input', {str(source)!r}, '--output', {str(tmp_path)!r} + f'/{{name}}.jsonl'])\n"
        "    print('exit code', name, code)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "unknown reward" not in result.stderr, result.stderr[-2000:]
    codes = dict(line.split()[2:] for line in result.stdout.splitlines() if line.startswith("exit code "))
    assert codes == {name: "0" for name in BUILT_IN}
    assert all(len((tmp_path / f"{name}.jsonl").read_text().splitlines()) == 1 for name in BUILT_IN)
