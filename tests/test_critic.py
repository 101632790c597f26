"""Critics and critic refinement: comparison tasks built from on-policy groups, the held-out
agreement, endpoint critics that answer, are down or are slow, bad critic settings, a loop run with
critic refinement on real engines, and `k2rl score` of groups with a critic model."""

import asyncio
import dataclasses
import json
import random
from pathlib import Path

import pytest

from conftest import TINY_SPEC
from critic_server import ScriptedEndpoint
from rewards import RewardScorer, register
from rewards.rubric import PairJudgement, Verdict
from rl.bootstrap import BootstrapSpec, bootstrap, check_line, comparison_example
from rl.data.arithmetic import arithmetic_problem
from rl.cli import main
from rl.config import ConfigError, load_config
from rl.critique import ComparisonPair, CriticRefinement, heldout_agreement, pair_of
from rl.loop import Controller
from rl.records import EpisodeStatus, RewardResult, Task, Trajectory
from rollout.critic import CriticError, EndpointCritic, ModelCritic
from rollout.rendering import Renderer

A, B = Verdict.A, Verdict.B


@register("even-length")
def even_length(task: Task, response: str) -> RewardResult:
    """A verifier that splits a random policy's responses about evenly: 1 for an even number of characters."""
    return RewardResult(float(len(response) % 2 == 0), "even" if len(response) % 2 == 0 else "odd")


@pytest.fixture(scope="module")
def critic_policy(tmp_path_factory):
    """A tiny self-critique policy: the bootstrap with comparison examples and room for them."""
    path = tmp_path_factory.mktemp("critic-policy") / "tiny-critic"
    bootstrap(path, dataclasses.replace(TINY_SPEC, max_positions=512, comparison_fraction=0.3))
    return path


def _member(group: str, index: int, text: str, score: float, failed: bool = False) -> Trajectory:
    task = Task(group, ({"role": "user", "content": f"Question {group}?"},), "arithmetic", "math", {"answer": "1"})
    reward = RewardResult(0.0, "reward_error: boom", error="Traceback") if failed else RewardResult(score, "scored")
    return Trajectory(task, group, index, [1], [2], [1], [-0.1], [0], [1.0], status=EpisodeStatus.COMPLETED,
                      response_text=text, reward=reward)


def _shown(prompt: str) -> tuple[str, str]:
    first = prompt.split("Response A: ", 1)[1].split("\n\nResponse B: ", 1)[0]
    second = prompt.split("\n\nResponse B: ", 1)[1].split("\n\nWhich response is better?", 1)[0]
    return first, second


def test_critic_tasks_from_a_mixed_group_carry_the_gold_verdict(critic_policy, tmp_path):
    config = load_config(None, ["reward.critic.share=0.5", "data.prompts_per_step=4", "rollout.max_model_len=512"])
    refinement = CriticRefinement(config, tmp_path)
    groups = {
        "mixed": [_member("mixed", 0, "wrong 1", 0.0), _member("mixed", 1, "right", 1.0), _member("mixed", 2, "wrong 2", 0.0)],
        "all-right": [_member("all-right", i, f"right {i}", 1.0) for i in range(3)],
        # A failed reward says nothing: with it left out, the group's scores are all equal.
        "one-failed": [_member("one-failed", 0, "a", 0.0), _member("one-failed", 1, "b", 0.0, failed=True)],
    }
    refinement.observe(groups, Renderer.from_pretrained(str(critic_policy)), 512)
    assert refinement.critic_task_count(4) == 2, "one group has verifier scores that differ: its pair, in both orders"
    tasks = refinement.step_tasks([], 2)
    assert [task.reward_spec["gold"] for task in tasks] == ["A", "B"]
    forward, backward = (_shown(task.messages[0]["content"]) for task in tasks)
    assert forward == backward[::-1]
    for task in tasks:
        assert (task.task_type, task.reward) == ("critique", "critic_verdict")
        first, second = _shown(task.messages[0]["content"])
        assert "right" in (first, second) and {first, second} - {"right"} <= {"wrong 1", "wrong 2"}
        assert task.reward_spec["gold"] == ("A" if first == "right" else "B")
        assert task.messages[0]["content"].startswith("The better response has the correct final answer.")
    # The pairs are used once.
    assert refinement.critic_task_count(4) == 0


def test_a_check_line_marks_each_character_and_labels_the_answer():
    assert check_line("A", 22, 26) == "A: 22_ 26_ = x = wrong"
    assert check_line("B", 8, 8) == "B: 8__ 8__ = = = right"
    # A shorter answer that is a prefix of the right one differs in its fill.
    assert check_line("A", 12, 120) == "A: 12_ 120 = = x wrong"


def test_comparison_examples_check_both_answers_and_end_with_the_verdict_that_follows(critic_policy):
    spec = BootstrapSpec(comparison_fraction=0.5, both_wrong_fraction=0.2)
    rng = random.Random(1)
    tokenizer = Renderer.from_pretrained(str(critic_policy)).tokenizer
    verdicts, line_lengths = set(), set()
    for _ in range(200):
        problem = arithmetic_problem(rng)
        messages, reply = comparison_example(problem, rng, spec, "rubric")
        working, first, second, verdict = reply.split("\n")
        assert working == problem.worked_solution()
        first_right, second_right = first.endswith("right"), second.endswith("right")
        shown_first, _ = _shown(messages[0]["content"])
        assert first_right == shown_first.endswith(f"\\boxed{{{problem.answer}}}.")
        expected = "A" if first_right > second_right else "B" if second_right > first_right else "TIE"
        assert verdict == f"VERDICT: {expected}"
        verdicts.add(expected)
        line_lengths |= {len(tokenizer(line, add_special_tokens=False)["input_ids"]) for line in (first, second)}
    assert verdicts == {"A", "B", "TIE"}
    # Every check line is the same number of tokens, whatever its answers' lengths: each mark lies
    # a fixed distance after the characters it compares.
    assert len(line_lengths) == 1


def test_both_orders_of_a_pair_and_the_gold_verdict():
    pair = ComparisonPair("Q?", better="long and right", worse="short")
    assert pair.task("rubric", better_first=True, task_id="c0").reward_spec == {"gold": "A"}
    assert pair.task("rubric", better_first=False, task_id="c1").reward_spec == {"gold": "B"}
    members = [_member("g", 0, "x", 0.0), _member("g", 1, "y", 0.0)]
    assert pair_of(members, random.Random(0)) is None


def test_heldout_agreement_counts_an_order_dependent_or_invalid_verdict_as_a_miss():
    pairs = [ComparisonPair("q", "longer better", "worse"), ComparisonPair("q", "b", "longer worse"),
             ComparisonPair("q", "better!", "worse"), ComparisonPair("q", "better", "worse")]
    # Each judgement's `first` is the better response, shown as A in the forward order.
    judgements = [
        PairJudgement(0, 1, A, B),  # the better one in both orders: a hit
        PairJudgement(0, 1, A, A),  # follows the position: a miss
        PairJudgement(0, 1, A, None),  # one order invalid: a miss
        PairJudgement(0, 1, B, A),  # the worse one in both orders: a miss
    ]
    metrics = heldout_agreement(judgements, pairs)
    assert metrics == {"critic_agreement": 0.25, "critic_length_agreement": 0.75, "critic_heldout_invalid_frac": 1 / 8}


def _group(task: Task, count: int = 3) -> list[Trajectory]:
    return [Trajectory(task, "g", i, [], response_text=f"answer {i}", status=EpisodeStatus.COMPLETED) for i in range(count)]


RUBRIC_TASK = Task("t", ({"role": "user", "content": "How many?"},), "math", "rubric", {"rubrics": "compact"})


def test_an_endpoint_critic_answers_on_loopback():
    with ScriptedEndpoint(lambda prompt: "VERDICT: TIE") as endpoint:
        critic = EndpointCritic.connect(endpoint.url, "", timeout_s=10, max_concurrency=2)
        replies = asyncio.run(critic.generate([[{"role": "user", "content": f"q{i}"}] for i in range(5)], max_tokens=8))
    assert replies == ["VERDICT: TIE"] * 5 and sorted(endpoint.prompts) == [f"q{i}" for i in range(5)]
    assert critic.take_busy_seconds() > 0 and critic.take_busy_seconds() == 0


def test_an_endpoint_that_is_down_or_slow_ends_scoring_with_a_clear_reason():
    with ScriptedEndpoint(lambda prompt: "VERDICT: A", delay_s=3) as endpoint:
        slow = EndpointCritic.connect(endpoint.url, "", timeout_s=0.5, max_concurrency=4)
        results = asyncio.run(RewardScorer(0).score_group(_group(RUBRIC_TASK), slow, budget_penalty=0.0))
        url = endpoint.url
    assert all(r.failed for r in results)
    assert results[0].reason == f"reward_error: CriticError: critic endpoint {url}: no answer within reward.critic.timeout_s=0.5s"
    # The server is gone now: the same critic is down.
    results = asyncio.run(RewardScorer(0).score_group(_group(RUBRIC_TASK), slow, budget_penalty=0.0))
    assert results[0].reason.startswith(f"reward_error: CriticError: critic endpoint {url}: unreachable")
    with pytest.raises(CriticError, match=r"critic endpoint http://127.0.0.1:9/v1: unreachable"):
        EndpointCritic.connect("http://127.0.0.1:9/v1", "", timeout_s=2, max_concurrency=1)
    with ScriptedEndpoint(lambda prompt: "") as endpoint:
        with pytest.raises(CriticError, match=r"does not serve model 'gpt-9' \(it lists: scripted-critic\)"):
            EndpointCritic.connect(endpoint.url, "gpt-9", timeout_s=2, max_concurrency=1)


def test_bad_critic_settings_are_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"reward.critic.backend: '.*nowhere' is not \"policy\", an http\(s\) URL, or a Hugging Face"):
        load_config(None, [f"reward.critic.backend={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match=r"reward.critic.share must be in \[0, 1\)"):
        load_config(None, ["reward.critic.share=1.5"])
    with pytest.raises(ConfigError, match=r"reward.train_reward: unknown reward 'rubrik'"):
        load_config(None, ["reward.train_reward=rubrik"])
    with pytest.raises(CriticError, match=r"critic model .* is not a Hugging Face model directory \(no config.json\)"):
        ModelCritic.start(str(tmp_path), load_config(), 1, 256, 1)
    config = load_config(None, ["reward.critic.share=0.25", "reward.critic.backend=http://127.0.0.1:9/v1"])
    with pytest.raises(ConfigError, match=r"reward.critic.share > 0 trains the policy as its own critic"):
        CriticRefinement(config, tmp_path)
    config = load_config(None, ["reward.train_reward=rubric", "reward.train_reward_spec={schedule: everyone}"])
    with pytest.raises(ConfigError, match=r"reward.train_reward_spec: schedule must be anchor or all_pairs"):
        Controller(config, tmp_path / "run")


def test_train_reward_rescores_tasks_with_their_own_reward_as_verifier(tmp_path):
    config = load_config(None, ["reward.train_reward=rubric", "reward.train_reward_spec={rubrics: compact, verifier_weight: 0.5}"])
    task = Task("t", ({"role": "user", "content": "q"},), "arithmetic", "math", {"answer": "4"})
    rescored = CriticRefinement(config, tmp_path).retarget(task)
    assert rescored.reward == "rubric"
    assert rescored.reward_spec == {"rubrics": "compact", "verifier_weight": 0.5, "verifier": "math", "answer": "4"}


def _write_tasks(path, count: int):
    path.write_text("".join(json.dumps({"prompt": f"Tom has {i} coins and finds {i + 2} more. How many coins?",
                                        "reward": "even-length", "task_type": "arithmetic"}) + "\n" for i in range(count)))
    return path


@pytest.mark.integration
def test_two_iterations_with_critic_refinement_then_the_trained_policy_scores_groups(critic_policy, ray_cluster, tmp_path, capsys):
    tasks = _write_tasks(tmp_path / "tasks.jsonl", 8)
    config = load_config(None, [
        "steps=2", "data.prompts_per_step=4", "rollout.n_samples=4", "data.eval_size=4", "data.eval_every=1",
        f"data.train_path={tasks}", f"data.eval_path={tasks}", "rollout.max_model_len=512",
        "rollout.token_budgets={arithmetic: 24, critique: 8}", "reward.critic.share=0.5", "reward.critic.heldout_pairs=3",
        "trainer.data_parallel_size=1", "rollout.num_engines=1", "trainer.micro_batch_size=2", "trainer.optimizer_steps_per_batch=2", "checkpoint.every=2", f"model.path={critic_policy}",
    ])
    summary = Controller(config, tmp_path / "run").run(str(critic_policy))
    assert summary.weight_version == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert 0 <= row["critic_agreement"] <= 1 and 0 <= row["critic_length_agreement"] <= 1, row
    assert "critic_tasks" not in rows[1], "the first step has no groups to build critic tasks from"
    assert rows[2]["critic_tasks"] == 2 and 0 <= rows[2]["critic_task_reward_mean"] <= 1
    assert all("time_critic_s" in row for row in rows[1:])
    heldout = [json.loads(line) for line in (tmp_path / "run" / "critic_heldout.jsonl").read_text().splitlines()]
    assert len(heldout) == 3
    # The verifier's better response has an even length (the worse one is odd, or cut at its budget).
    assert all(len(pair["better"]) % 2 == 0 and pair["better"] != pair["worse"] for pair in heldout)
    assert list((tmp_path / "run" / "checkpoints").glob("*/critique.json"))
    report = json.loads((critic_policy / "bootstrap.json").read_text())["report"]
    assert 0 <= report["comparison_accuracy"] <= 1
    _score_groups_with_a_critic_model(tmp_path / "run" / "final", tmp_path, capsys)


def _score_groups_with_a_critic_model(critic: Path, tmp_path: Path, capsys) -> None:
    """`k2rl score` with the trained policy as the critic: the run's final directory, as saved,
    loads in a fresh vLLM engine of its own."""
    source, target = tmp_path / "groups.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"Ana has {i} pens and buys 4 more. How many pens?",
                                          "responses": [f"\\boxed{{{i + 4}}}", f"\\boxed{{{i + 5}}}", "no idea"],
                                          "rubrics": "compact", "max_tokens": 8}) + "\n" for i in range(2)))
    # In-process, on the session's Ray cluster: the command starts the critic's engine and stops it.
    capsys.readouterr()
    code = main(["score", "--reward", "rubric", "--input", str(source), "--output", str(target), "--critic-model", str(critic)])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:]
    out = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(out) == 2
    for row in out:
        assert len(row["rewards"]) == 3 and all(0 <= r <= 1 for r in row["rewards"])
        # The tiny critic answers in the verdict format, or its group fails with that reason.
        for info in row["reward_info"]:
            assert info["reason"].startswith(("rubric: ", "reward_error: CriticFormatError: the critic gave no valid verdict"))
    assert "k2rl: scored 6 responses" in printed.out


def test_score_groups_with_an_endpoint_critic(tmp_path, capsys):
    source, target = tmp_path / "groups.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join([
        json.dumps({"id": "g1", "prompt": "Ana has 3 pens and buys 4 more.", "responses": ["\\boxed{7}", "\\boxed{8}"], "rubrics": "compact"}),
        json.dumps({"prompt": "x", "responses": "not a list"}),
    ]) + "\n")

    def first_wins_when_it_boxes_seven(prompt: str) -> str:
        first = prompt.split("Response A: ", 1)[1]
        return "VERDICT: A" if first.startswith("\\boxed{7}") else "VERDICT: B"

    with ScriptedEndpoint(first_wins_when_it_boxes_seven) as endpoint:
        assert main(["score", "--reward", "rubric", "--input", str(source), "--output", str(target), "--critic-url", endpoint.url]) == 0
    out = [json.loads(line) for line in target.read_text().splitlines()]
    assert out[0]["rewards"] == pytest.approx([5 / 6, 1 / 6]) and out[0]["id"] == "g1"
    assert out[1]["reward_info"][0]["reason"] == "malformed_line: no 'responses' list of strings"
    assert "3 responses" in capsys.readouterr().out


def test_score_groups_needs_a_working_critic(tmp_path, capsys):
    source = tmp_path / "groups.jsonl"
    source.write_text(json.dumps({"prompt": "x", "responses": ["a", "b"]}) + "\n")
    out = str(tmp_path / "out.jsonl")
    assert main(["score", "--reward", "rubric", "--input", str(source), "--output", out]) == 2
    assert main(["score", "--reward", "rubric", "--input", str(source), "--output", out, "--critic-url", "http://127.0.0.1:9/v1"]) == 2
    assert main(["score", "--reward", "rubric", "--input", str(source), "--output", out, "--critic-model", str(tmp_path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 3
    assert "give --critic-model DIR or --critic-url URL" in errors[0]
    assert "critic endpoint http://127.0.0.1:9/v1: unreachable" in errors[1]
    assert "is not a Hugging Face model directory" in errors[2]
