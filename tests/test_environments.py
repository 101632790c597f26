"""The built-in environments, entry points, and the EnvironmentHost.

Unit level (no Ray, no vLLM): guess-number, reasoning-gym, python-tool (local sandbox), the
registry's errors and its `k2rl.environments` entry points. Integration (Ray): synchronous
environments in environment workers, including a hung step and the replay of its neighbours.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray
from ray import cloudpickle

from rl.records import EpisodeStatus, Task
from rollout.environments import (
    Environment,
    EnvironmentConfigError,
    EnvironmentHost,
    EnvironmentWorkerError,
    SingleTurn,
    make,
    register,
)
from rollout.environments.guess_number import GuessNumber
from rollout.episode import Episode, EpisodeSettings
from sandboxes import SandboxConfig, SandboxLimits, open_sandbox
from sandboxes.shared import use_sandbox

# Ray workers cannot import this module (tests/ is not on their path): its environments travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

FIXTURE_DISTRIBUTION = Path(__file__).parent / "fixtures" / "entry_point_dist"


class AsyncEcho(Environment):
    async def reset(self, task, seed):
        return [{"role": "user", "content": f"seed {seed}"}], {}

    async def step(self, action):
        return [{"role": "user", "content": action}], 0.0, False, False, {}


class Counter(Environment):
    """Synchronous: counts from the seed, one per step; some actions misbehave on purpose."""

    def __init__(self, increment: int = 1):
        self.increment = increment
        self.count = 0

    def reset(self, task, seed):
        self.count = seed
        return [{"role": "user", "content": "count"}], {"pid": os.getpid()}

    def step(self, action):
        if action == "hang":
            time.sleep(3600)
        if action == "raise":
            raise ValueError("the counter refuses")
        if action == "malformed":
            return "not a list of messages", 0.0, False, False, {}
        self.count += self.increment
        return [{"role": "user", "content": str(self.count)}], 1.0, False, False, {"pid": os.getpid()}


class WorkedExample(Environment):
    """Async: a prompt that holds a worked example (an assistant message); records the actions it gets."""

    def __init__(self, no_prompt: bool = False):
        self.no_prompt = no_prompt
        self.actions: list[str] = []

    async def reset(self, task, seed):
        if self.no_prompt:
            return [], {}
        return [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"},
                {"role": "user", "content": "2 + 2?"}], {}

    async def step(self, action):
        self.actions.append(action)
        return [{"role": "user", "content": "next"}], 0.0, False, False, {}


class Sleepy(Environment):
    """Synchronous: every reset takes 0.4 s."""

    def reset(self, task, seed):
        time.sleep(0.4)
        return [{"role": "user", "content": "hi"}], {}

    def step(self, action):
        return [], 0.0, True, False, {}


register("test-async-echo", AsyncEcho)
register("test-counter", Counter)
register("test-worked-example", WorkedExample)
register("test-sleepy", Sleepy)
register("test-missing-module", "k2rl_no_such_module:Environment")


def task_for(env: str, messages: tuple = (), **env_kwargs) -> Task:
    return Task("t1", messages, "test", reward="", env=env, env_kwargs=env_kwargs)


# -- guess-number -------------------------------------------------------------------------------


def test_guess_number_is_played_to_the_end_by_bisection():
    async def play(seed: int) -> list[tuple[int, str]]:
        env = make("guess-number", max_value=100)
        prompt, _ = await env.reset(task_for("guess-number"), seed)
        assert prompt[0]["role"] == "user" and "between 1 and 100" in prompt[0]["content"]

        hint, reward, terminated, _, info = await env.step("no idea")
        assert hint[0]["role"] == "user" and "whole number" in hint[0]["content"]
        assert (reward, terminated, info["guess"]) == (0.0, False, None)

        low, high, answers = 1, 100, []
        while True:
            guess = (low + high) // 2
            # The last integer of the reply is the guess.
            observation, reward, terminated, truncated, info = await env.step(f"Between {low} and {high}: {guess}")
            assert info["guess"] == guess and not truncated
            if terminated:
                assert (observation, reward) == ([], 1.0)
                return answers + [(guess, "right")]
            assert reward == 0.0
            answer = observation[0]["content"]
            answers.append((guess, answer))
            low, high = (guess + 1, high) if answer == "Higher." else (low, guess - 1)
            assert len(answers) < 8, "bisection over 1..100 takes at most 7 guesses"

    first = asyncio.run(play(seed=3))
    assert first == asyncio.run(play(seed=3)), "the seed fixes the secret"
    assert {answer for _, answer in first} <= {"Higher.", "Lower.", "right"}


def test_guess_number_rejects_a_bad_range():
    with pytest.raises(EnvironmentConfigError, match="'guess-number'.*max_value"):
        make("guess-number", max_value=0)


# -- reasoning-gym ------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["basic_arithmetic", "chain_sum", "countdown"])
def test_reasoning_gym_scores_with_the_dataset(dataset):
    env = make("reasoning-gym", dataset=dataset, config={"size": 50})
    prompt, info = env.reset(task_for("reasoning-gym"), seed=1234)
    assert prompt[0]["role"] == "system" and "<answer>" in prompt[0]["content"]
    assert prompt[1]["role"] == "user" and prompt[1]["content"]
    assert info["index"] == 1234 % 50

    again = make("reasoning-gym", dataset=dataset, config={"size": 50})
    assert again.reset(task_for("reasoning-gym"), seed=1234)[0] == prompt, "the seed picks the entry"

    right = env.step(f"<think>worked it out</think>\n<answer>{info['answer']}</answer>")
    assert right[1:4] == (1.0, True, False)
    assert right[4]["answer"] == info["answer"]
    assert env.step("<answer>-123456789</answer>")[1] < 1.0
    untagged = env.step(f"the answer is {info['answer']}")
    assert untagged[4]["answer"] is None and untagged[1] < 1.0, "an answer outside <answer> tags does not count"


def test_reasoning_gym_names_a_bad_dataset_or_config():
    with pytest.raises(EnvironmentConfigError, match="'reasoning-gym'.*'no_such_dataset'"):
        make("reasoning-gym", dataset="no_such_dataset")
    with pytest.raises(EnvironmentConfigError, match="'reasoning-gym'.*'chain_sum'.*no_such_key"):
        make("reasoning-gym", dataset="chain_sum", config={"no_such_key": 1})
    with pytest.raises(EnvironmentConfigError, match="'reasoning-gym'.*system_prompt"):
        make("reasoning-gym", dataset="chain_sum", system_prompt="nonexistent")


# -- python-tool --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_sandbox():
    sandbox = open_sandbox(SandboxConfig(backend="local", pool_size=2, limits=SandboxLimits(timeout_s=5.0)))
    use_sandbox(sandbox)
    yield sandbox
    use_sandbox(None)
    sandbox.close()


def tool_call(code: str) -> str:
    return f"Let me check.\n```python\n{code}\n```"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_python_tool_runs_tool_calls_until_the_final_answer(local_sandbox):
    question = ({"role": "user", "content": "What is 6 * 7?"},)

    async def episode():
        env = make("python-tool", limits={"timeout_s": 1.0}, max_output_chars=200)
        prompt, _ = await env.reset(task_for("python-tool", question), seed=0)
        assert [m["role"] for m in prompt] == ["system", "user"] and "```python" in prompt[0]["content"]
        assert prompt[1] == question[0]

        printed = await env.step(tool_call("print(6 * 7)"))
        assert printed == ([{"role": "tool", "content": "42\n"}], 0.0, False, False, {"tool_calls": 1, "status": "ok"})

        raised = (await env.step(tool_call("print('before')\n1 / 0")))[0][0]["content"]
        assert raised.startswith("[status: runtime_error, exit code 1]\nbefore\n")
        assert raised.rstrip().endswith("ZeroDivisionError: division by zero")

        looped = await env.step(tool_call("while True:\n    pass"))
        assert looped[0][0]["content"].startswith("[status: timeout]") and looped[2] is False

        flood = (await env.step(tool_call("print('x' * 1000)")))[0][0]["content"]
        assert flood == "x" * 100 + "\n[... 801 characters cut ...]\n" + "x" * 99 + "\n"

        unlabelled = "The answer is 42, as this shows:\n```\n6 * 7 = 42\n```"
        assert await env.step(unlabelled) == ([], 0.0, True, False, {"tool_calls": 0})

    asyncio.run(episode())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_python_tool_adds_its_instructions_to_the_tasks_system_message(local_sandbox):
    messages = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"})
    prompt, _ = asyncio.run(make("python-tool").reset(task_for("python-tool", messages), seed=0))
    assert len(prompt) == 2 and prompt[0]["content"].startswith("Be brief.\n\n") and "```python" in prompt[0]["content"]
    assert messages[0]["content"] == "Be brief.", "the task's own messages are left alone"
    with pytest.raises(EnvironmentConfigError, match="'python-tool'.*no_such_limit"):
        make("python-tool", limits={"no_such_limit": 1})


# -- the registry and the host, without workers -------------------------------------------------


def test_host_makes_single_turn_and_async_environments_in_process():
    host = EnvironmentHost(workers=1, step_timeout_s=5.0)
    plain = Task("t0", ({"role": "user", "content": "hi"},), "test", reward="math")
    assert isinstance(host.make(plain), SingleTurn)
    assert type(host.make(task_for("test-async-echo"))) is AsyncEcho
    assert type(host.make(task_for("guess-number", max_value=5))) is GuessNumber
    assert host.worker_handles() == [], "no worker for environments that run in process"
    host.close()


@pytest.mark.parametrize(
    ("task", "error"),
    [
        (task_for("no-such-env"), "unknown environment 'no-such-env'"),
        (task_for("test-missing-module"), "'test-missing-module'.*failed to import.*k2rl_no_such_module"),
        (task_for("test-async-echo", colour="red"), "'test-async-echo' rejects its arguments \\['colour'\\]"),
        (task_for("test-counter", colour="red"), "'test-counter' rejects its arguments \\['colour'\\]"),
    ],
    ids=["unknown-id", "failing-entry-point", "async-rejects-kwargs", "sync-rejects-kwargs"],
)
def test_host_names_the_environment_it_cannot_make(task, error):
    host = EnvironmentHost(workers=1, step_timeout_s=5.0)
    with pytest.raises(EnvironmentConfigError, match=error):
        host.make(task)
    assert host.worker_handles() == []
    host.close()


def test_installed_distributions_add_environments_through_entry_points():
    # A fresh interpreter: the registry scans the entry points once per process.
    script = """
import asyncio, json
from rl.records import Task
from rollout.environments import EnvironmentConfigError, EnvironmentHost, env_ids

host = EnvironmentHost(workers=1, step_timeout_s=5.0)
echo = host.make(Task("t", (), "test", reward="", env="fixture-echo"))
prompt, _ = asyncio.run(echo.reset(None, 7))
try:
    host.make(Task("t", (), "test", reward="", env="fixture-broken"))
    broken = ""
except EnvironmentConfigError as error:
    broken = str(error)
try:
    host.make(Task("t", (), "test", reward="", env="guess-number"))
    shadowed = ""
except EnvironmentConfigError as error:
    shadowed = str(error)
print(json.dumps({"ids": env_ids(), "echo": type(echo).__module__, "prompt": prompt, "broken": broken, "shadowed": shadowed}))
"""
    path = os.pathsep.join(filter(None, [str(FIXTURE_DISTRIBUTION), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path}, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert {"fixture-echo", "fixture-broken", "guess-number"} <= set(result["ids"])
    assert result["echo"] == "k2rl_fixture_envs"
    assert result["prompt"] == [{"role": "user", "content": "say something (seed 7)"}]
    assert "'fixture-broken'" in result["broken"] and "NoSuchEnvironment" in result["broken"]
    # An entry point that takes a built-in's id is refused, not silently ignored.
    assert result["shadowed"] == ("environment 'guess-number' is registered to 'rollout.environments.guess_number:GuessNumber' "
                                  "and also declared by the installed entry point 'k2rl_fixture_envs:Echo': rename the entry "
                                  "point's environment")


# -- the host with environment workers (Ray) ----------------------------------------------------


def assert_dead(handles: list) -> None:
    """Each actor dies within a minute. ray.kill is asynchronous: a call sent right after it may
    still be served, so the check asks until a call fails."""
    deadline = time.monotonic() + 60
    for handle in handles:
        while True:
            try:
                ray.get(handle.ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
            except ray.exceptions.RayActorError:
                break
            assert time.monotonic() < deadline, f"{handle} is still alive a minute after it was killed"
            time.sleep(0.2)


@pytest.mark.integration
def test_sync_environments_run_in_workers(ray_cluster):
    host = EnvironmentHost(workers=2, step_timeout_s=30.0)

    async def episodes():
        first, second = host.make(task_for("test-counter")), host.make(task_for("test-counter", increment=10))
        (_, first_info), (_, second_info) = await asyncio.gather(
            first.reset(task_for("test-counter"), 5), second.reset(task_for("test-counter"), 100)
        )
        assert first_info["pid"] != second_info["pid"], "the two episodes go to the two workers"
        assert os.getpid() not in (first_info["pid"], second_info["pid"])

        assert await first.step("go") == ([{"role": "user", "content": "6"}], 1.0, False, False, {"pid": first_info["pid"]})
        assert (await second.step("go"))[0] == [{"role": "user", "content": "110"}]

        with pytest.raises(ValueError, match="^the counter refuses$"):
            await first.step("raise")
        # The host hands back what the environment returned; judging it is Episode's job.
        assert (await second.step("malformed"))[0] == "not a list of messages"
        first.close()
        second.close()

    asyncio.run(episodes())
    handles = host.worker_handles()
    assert len(handles) == 2
    host.close()
    assert_dead(handles)
    with pytest.raises(EnvironmentWorkerError, match="closed"):
        host.make(task_for("test-counter"))


@pytest.mark.integration
def test_a_hung_step_replaces_its_worker_and_its_neighbours_replay(ray_cluster):
    host = EnvironmentHost(workers=1, step_timeout_s=8.0)

    async def episodes():
        hung, neighbour = host.make(task_for("test-counter")), host.make(task_for("test-counter"))
        await hung.reset(task_for("test-counter"), 0)
        _, before = await neighbour.reset(task_for("test-counter"), 10)
        await neighbour.step("a")
        await neighbour.step("b")
        old_worker = host.worker_handles()

        with pytest.raises(EnvironmentWorkerError, match="'test-counter' step did not return within.*task 't1'"):
            await hung.step("hang")
        with pytest.raises(EnvironmentWorkerError, match="did not return"):
            await hung.step("go")
        hung.close()
        assert host.worker_handles() != old_worker
        assert_dead(old_worker)

        observation, _, _, _, after = await neighbour.step("c")
        assert observation == [{"role": "user", "content": "13"}], "reset and both steps replayed, then this one"
        assert after["pid"] != before["pid"]

        # A caller that stops waiting first (its episode was cancelled) still gets the hung worker replaced.
        impatient = host.make(task_for("test-counter"))
        await impatient.reset(task_for("test-counter"), 0)
        replaced = host.worker_handles()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(impatient.step("hang"), 0.5)
        observation = (await neighbour.step("d"))[0]
        assert observation == [{"role": "user", "content": "14"}]
        assert host.worker_handles() != replaced
        neighbour.close()
        impatient.close()

    asyncio.run(episodes())
    handles = host.worker_handles()
    host.close()
    assert_dead(handles)


def _episode(task: Task, turns: int = 0, step_timeout_s: float = 5.0) -> Episode:
    settings = EpisodeSettings(temperature=1.0, top_p=1.0, token_budget=8, max_turns=4, max_model_len=64,
                               step_timeout_s=step_timeout_s)
    episode = Episode(task, "g", 0, settings, run_seed=0)
    episode._turns = turns
    return episode


def test_an_environment_that_gives_no_prompt_fails_its_episode():
    context = SimpleNamespace(make_env=lambda task: WorkedExample(no_prompt=True))
    trajectory = asyncio.run(_episode(task_for("test-worked-example")).run(context))
    assert trajectory.status is EpisodeStatus.FAILED
    assert "'test-worked-example' reset returned no messages" in trajectory.error


def test_a_restored_episode_replays_the_policys_actions_not_the_prompts_examples():
    """Resumed from a checkpoint, an episode rebuilds its environment: the same reset, then the
    policy's own replies, which come after the prompt (whose assistant messages are examples)."""
    task = task_for("test-worked-example")
    episode = _episode(task, turns=4)
    prompt, _ = asyncio.run(WorkedExample().reset(task, 0))
    episode.trajectory.prompt_ids = [1, 2, 3]
    episode.trajectory.messages = [*prompt, {"role": "assistant", "content": "4"}, {"role": "user", "content": "next"}]
    restored = Episode.from_state(episode.state_dict(), episode.settings, run_seed=0)
    environment = WorkedExample()
    trajectory = asyncio.run(restored.run(SimpleNamespace(make_env=lambda task: environment)))
    assert environment.actions == ["4"]
    assert (trajectory.status, trajectory.finish_reason) == (EpisodeStatus.TRUNCATED, "max_turns")


@pytest.mark.integration
def test_waiting_for_a_busy_worker_does_not_count_against_the_step_timeout(ray_cluster):
    """Six episodes share one worker whose resets take 0.4 s each: the last waits 2 s for its turn
    (and all wait for the worker to start), against a 1 s limit that is only the call's own."""
    host = EnvironmentHost(workers=1, step_timeout_s=1.0)
    task = task_for("test-sleepy")

    async def resets():
        episodes = [_episode(task, step_timeout_s=1.0) for _ in range(6)]
        for episode in episodes:
            episode.env = host.make(task)
        await asyncio.gather(*(episode._call("reset", task, 0) for episode in episodes))
        for episode in episodes:
            episode.close()

    try:
        asyncio.run(resets())
    finally:
        handles = host.worker_handles()
        host.close()
    assert_dead(handles)
