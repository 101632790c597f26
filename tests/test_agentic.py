"""Agentic tool use end to end: the tool-use policy's SFT episodes are laid out token for token as
the python-tool environment's episodes are, and the loop runs python-tool episodes with programs
in Docker sandboxes, logging its tool-call rate and turns per episode."""

import dataclasses
import json
import os

import pytest

from conftest import TINY_SPEC, TINY_WORKERS
from rl.bootstrap import tool_episode, train_tokenizer
from rl.config import load_config
from rl.data.arithmetic import TOOL_KIND, arithmetic_problem
from rl.loop import Controller
from rollout.environments.python_tool import INSTRUCTIONS
from rollout.rendering import Renderer
from sandboxes import SandboxConfig, docker_available, open_sandbox
from sandboxes.docker_pool import LABEL_OWNER, owner_label
from sandboxes.shared import use_sandbox

IMAGE = "k2rl-sandbox:latest"


def test_a_tool_episode_of_the_sft_is_what_the_environment_would_append():
    import random

    spec = dataclasses.replace(TINY_SPEC, tool_fraction=0.5, tool_call_fraction=1.0)
    renderer = Renderer(train_tokenizer(spec), "chat")
    problem = arithmetic_problem(random.Random(0), kinds=(TOOL_KIND,))
    ids, labels = tool_episode(problem, renderer, random.Random(0), spec)

    prompt = renderer.prompt([{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": problem.question}])
    reply = renderer.bridge([{"role": "tool", "content": f"{problem.answer}\n"}])
    assert ids[:len(prompt)] == prompt and set(labels[:len(prompt)]) == {-100}
    trained = [token for token, label in zip(ids, labels) if label != -100]
    text = renderer.tokenizer.decode(trained, skip_special_tokens=True)
    assert text == f"```python\nprint({problem.a} * {problem.b})\n```The answer is \\boxed{{{problem.answer}}}."
    # The tool's reply sits between the two assistant turns, masked out.
    call_end = ids.index(renderer.eos_token_id, len(prompt)) + 1
    assert ids[call_end:call_end + len(reply)] == reply and set(labels[call_end:call_end + len(reply)]) == {-100}

    direct_ids, direct_labels = tool_episode(problem, renderer, random.Random(0), dataclasses.replace(spec, tool_call_fraction=0.0))
    assert renderer.tokenizer.decode([t for t, l in zip(direct_ids, direct_labels) if l != -100], skip_special_tokens=True) == problem.direct_solution()


@pytest.mark.integration
def test_two_iterations_of_python_tool_episodes_in_docker_sandboxes(tiny_policy, tiny_workers, tmp_path):
    reason = docker_available(IMAGE)
    if reason is not None:
        if os.environ.get("K2RL_REQUIRE_DOCKER") == "1":
            pytest.fail(f"K2RL_REQUIRE_DOCKER=1 but the Docker sandbox is unavailable: {reason}")
        pytest.skip(f"Docker sandbox unavailable ({reason})")
    import docker

    sandbox = open_sandbox(SandboxConfig(backend="docker", image=IMAGE, pool_size=2))
    use_sandbox(sandbox)
    try:
        config = load_config(None, [f"model.path={tiny_policy}", *TINY_WORKERS, "steps=2", "data.prompts_per_step=2",
                                    "rollout.n_samples=2", "data.eval_size=2", "rollout.max_turns=3",
                                    "data.arithmetic_kinds=[mul-3x3]", "data.env=python-tool",
                                    "data.env_kwargs={limits: {timeout_s: 2}}"])
        summary = Controller(config, tmp_path / "run").run(str(tiny_policy), workers=tiny_workers)
    finally:
        use_sandbox(None)
        sandbox.close()
    assert summary.weight_version == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for row in rows[1:]:
        assert 1 <= row["turns_mean"] <= 3 and 0 <= row["tool_call_rate"] <= 1
        assert row["reward_error_frac"] == 0 and row["reward_reasons"].get("environment_error", 0) == 0
    leftover = docker.from_env().containers.list(all=True, filters={"label": f"{LABEL_OWNER}={owner_label()}"})
    assert not leftover, f"containers left behind: {[c.name for c in leftover]}"
