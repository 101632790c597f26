"""The README's examples work as written: a reward, a group reward, and an environment."""

import asyncio
import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.DOTALL)


def test_the_reward_examples_register_and_score():
    from rl.records import RewardResult, Task

    namespace: dict = {}
    [block] = [b for b in _python_blocks() if "@register(\"exact\")" in b]
    exec(block.replace('"exact"', '"readme-exact"').replace('"shortest"', '"readme-shortest"'), namespace)
    task = Task("t", (), "math", "readme-exact", {"answer": "42"})
    assert namespace["exact"](task, " 42 ") == RewardResult(1.0, "correct")
    results = asyncio.run(namespace["shortest"](task, ["aa", "a", "aaa"], None))
    assert [r.score for r in results] == [0.0, 1.0, 0.0]


def test_the_environment_example_plays_three_turns():
    from rl.records import Task
    from rollout.environments import EnvironmentHost

    namespace: dict = {}
    [block] = [b for b in _python_blocks() if "class Countdown" in b]
    exec(block.replace('"countdown-turns"', '"readme-countdown"'), namespace)
    task = Task("c1", (), "game", "", env="readme-countdown")
    env = EnvironmentHost(workers=1, step_timeout_s=5).make(task)

    async def play():
        messages, _ = await env.reset(task, 0)
        rewards = []
        for _ in range(3):
            _, reward, terminated, _, _ = await env.step("hello")
            rewards.append((reward, terminated))
        return messages, rewards

    messages, rewards = asyncio.run(play())
    assert messages[0]["role"] == "user" and rewards == [(0.0, False), (0.0, False), (1.0, True)]
