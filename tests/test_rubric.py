"""The `rubric` reward: strict verdicts, both orders, schedules, aggregation on hand-computed verdict
tables, the rubrics that reach the critic, and what a critic in the wrong format leads to."""

import asyncio
import re

import pytest

from rewards import RewardScorer
from rewards.rubric import (
    CriticStats,
    PairJudgement,
    RubricError,
    RubricSettings,
    Verdict,
    bradley_terry,
    comparison_pairs,
    critic_verdict_reward,
    load_rubric,
    parse_verdict,
    rubric_reward,
    win_rates,
)
from rl.config import ConfigError, load_config
from rl.records import EpisodeStatus, Task, Trajectory
from rollout.critic import EndpointCritic
from critic_server import MODEL, ScriptedEndpoint

A, B, TIE = Verdict.A, Verdict.B, Verdict.TIE


@pytest.mark.parametrize("reply, verdict", [
    ("VERDICT: A", A),
    ("Response B states 7, which is right.\nVERDICT: B", B),
    ("Both are equally good.\n\nVERDICT: TIE  \n\n", TIE),
    ("verdict: a", None),
    ("VERDICT: A.", None),
    ("VERDICT: C", None),
    ("VERDICT: A\nOn reflection, B is better.", None),
    ("VERDICT:A", None),
    ("", None),
])
def test_a_verdict_is_the_exact_last_line_or_invalid(reply, verdict):
    assert parse_verdict(reply) == verdict


def test_both_orders_of_a_pair():
    # forward shows `first` as A; backward shows `second` as A.
    consistent = PairJudgement(0, 1, A, B)
    assert consistent.outcomes() == [1.0, 1.0] and consistent.preference() == 1.0 and not consistent.order_dependent
    position_follower = PairJudgement(0, 1, A, A)
    assert position_follower.order_dependent and position_follower.preference() is None
    tie = PairJudgement(0, 1, TIE, TIE)
    assert tie.outcomes() == [0.5, 0.5] and tie.preference() == 0.5
    half_invalid = PairJudgement(0, 1, B, None)
    assert half_invalid.outcomes() == [0.0] and half_invalid.preference() is None and not half_invalid.order_dependent


def test_schedules_and_their_cost():
    assert comparison_pairs(4, "all_pairs") == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    # With the anchor schedule and both orders, K responses cost 2(K-1) comparisons.
    assert comparison_pairs(8, "anchor") == [(0, j) for j in range(1, 8)]
    with pytest.raises(ValueError, match="schedule must be anchor or all_pairs"):
        comparison_pairs(3, "round_robin")


# 0 beats 1 in both orders; 0 and 2 tie in one order, the other is invalid; 2 beats 1 in both orders.
TABLE = [PairJudgement(0, 1, A, B), PairJudgement(0, 2, TIE, None), PairJudgement(1, 2, B, A)]


def test_win_rate_on_a_hand_computed_table():
    # 0: 1 + 1 + 0.5 of 3; 1: 0 of 4; 2: 0.5 + 1 + 1 of 3.
    assert win_rates(3, TABLE) == pytest.approx([2.5 / 3, 0.0, 2.5 / 3])
    assert win_rates(2, [PairJudgement(0, 1, None, None)]) == [0.5, 0.5]


def test_bradley_terry_on_hand_computed_tables():
    # Two wins plus the virtual tie: 2.5 to 0.5, strengths 5 : 1.
    assert bradley_terry(2, [PairJudgement(0, 1, A, B)]) == pytest.approx([5 / 6, 1 / 6])
    # An order-dependent pair is one win each: no preference.
    assert bradley_terry(2, [PairJudgement(0, 1, A, A)]) == pytest.approx([0.5, 0.5])
    # A chain 0 > 1 > 2 (each 2.5 : 0.5): on a tree the fit is each edge's ratio, strengths 25 : 5 : 1,
    # and a score is the mean chance of beating each other response.
    chain = [PairJudgement(0, 1, A, B), PairJudgement(1, 2, A, B)]
    assert bradley_terry(3, chain, iterations=500) == pytest.approx(
        [(25 / 30 + 25 / 26) / 2, (5 / 30 + 5 / 6) / 2, (1 / 26 + 1 / 6) / 2], abs=1e-6
    )
    # A response with no valid verdict stays at 0.5; the others are scored among themselves.
    assert bradley_terry(3, [PairJudgement(0, 1, A, B), PairJudgement(0, 2, None, None)]) == pytest.approx([5 / 6, 1 / 6, 0.5])


def test_critic_stats_count_invalid_verdicts_position_bias_and_verifier_agreement():
    stats = CriticStats.of(TABLE, verifier_scores=[1.0, 0.0, 1.0])
    assert (stats.comparisons, stats.invalid, stats.pairs_judged, stats.order_dependent) == (6, 1, 2, 0)
    # The verifier separates (0, 1) and (1, 2); the critic decided both for the verifier's winner.
    assert (stats.verifier_pairs, stats.verifier_agreements) == (2, 2)
    metrics = (stats + CriticStats.of([PairJudgement(0, 1, A, A)], None)).metrics()
    assert metrics == {"critic_invalid_frac": 1 / 8, "critic_position_bias": 1 / 3, "critic_verifier_agreement": 1.0}
    assert CriticStats.from_components(stats.as_components()) == stats


def _boxed(text: str) -> str | None:
    found = re.findall(r"\\boxed\{(-?\d+)\}", text)
    return found[-1] if found else None


def prefers_seven(prompt: str) -> str:
    """A critic that knows the answer is 7: the response that boxes 7 wins, otherwise a tie."""
    first = prompt.split("Response A: ", 1)[1].split("\n\nResponse B: ", 1)[0]
    second = prompt.split("\n\nResponse B: ", 1)[1].split("\n\nWhich response is better?", 1)[0]
    right = [_boxed(first) == "7", _boxed(second) == "7"]
    verdict = "TIE" if right[0] == right[1] else ("A" if right[0] else "B")
    return f"The better one gets 7.\nVERDICT: {verdict}"


RESPONSES = ["The answer is \\boxed{7}.", "The answer is \\boxed{8}.", "3 + 4 = 7. The answer is \\boxed{7}.", "no idea"]


def _task(**spec) -> Task:
    return Task("t", ({"role": "user", "content": "Ana has 3 pens and buys 4 more. How many pens?"},), "arithmetic", "rubric",
                {"answer": "7", **spec})


def _score(task: Task, critic, responses=RESPONSES):
    return asyncio.run(rubric_reward(task, list(responses), critic))


def test_prescriptive_and_per_prompt_rubrics_reach_the_critic():
    with ScriptedEndpoint(prefers_seven) as endpoint:
        critic = EndpointCritic.connect(endpoint.url, "", timeout_s=10, max_concurrency=4)
        _score(_task(rubric="Count the pens twice."), critic)
    assert critic.model == MODEL
    # The anchor schedule, both orders: 2(K-1) comparisons.
    assert len(endpoint.prompts) == 2 * (len(RESPONSES) - 1)
    prescriptive = load_rubric("prescriptive")
    for prompt in endpoint.prompts:
        assert prescriptive in prompt and load_rubric("core") in prompt and "Count the pens twice." in prompt
        assert "Ana has 3 pens" in prompt
    assert "No opening praise" in prescriptive and "No self-justification" in prescriptive


def test_scores_follow_the_verdicts_and_mix_with_the_verifier():
    with ScriptedEndpoint(prefers_seven) as endpoint:
        critic = EndpointCritic.connect(endpoint.url, "", timeout_s=10, max_concurrency=4)
        win_rate = _score(_task(schedule="all_pairs", aggregation="win_rate"), critic)
        mixed = _score(_task(schedule="all_pairs", aggregation="win_rate", verifier="math", verifier_weight=1.0), critic)
    # All pairs, both orders: each response has 6 verdicts; the two right ones beat the two wrong
    # ones and tie each other.
    assert [r.score for r in win_rate] == pytest.approx([5 / 6, 1 / 6, 5 / 6, 1 / 6])
    assert [r.components["rubric"] for r in mixed] == pytest.approx([5 / 6, 1 / 6, 5 / 6, 1 / 6])
    assert [r.components["verifier"] for r in mixed] == [1.0, 0.0, 1.0, 0.0]
    assert [r.score for r in mixed] == pytest.approx([(5 / 6 + 1) / 2, 1 / 12, (5 / 6 + 1) / 2, 1 / 12])
    stats = CriticStats.from_components(mixed[0].components)
    assert stats.metrics() == {"critic_invalid_frac": 0.0, "critic_position_bias": 0.0, "critic_verifier_agreement": 1.0}


def test_a_critic_that_follows_the_position_is_counted_and_decides_nothing():
    with ScriptedEndpoint(lambda prompt: "VERDICT: A") as endpoint:
        results = _score(_task(), EndpointCritic.connect(endpoint.url, "", timeout_s=10, max_concurrency=4))
    assert [r.score for r in results] == pytest.approx([0.5] * 4)
    assert CriticStats.from_components(results[0].components).metrics()["critic_position_bias"] == 1.0


def test_a_critic_in_the_wrong_format_every_time_fails_the_group_with_the_reason():
    with ScriptedEndpoint(lambda prompt: "Response A is better!") as endpoint:
        critic = EndpointCritic.connect(endpoint.url, "", timeout_s=10, max_concurrency=4)
        group = [Trajectory(_task(), "g", i, [], response_text=text, status=EpisodeStatus.COMPLETED) for i, text in enumerate(RESPONSES)]
        results = asyncio.run(RewardScorer(0).score_group(group, critic, budget_penalty=0.0))
    assert all(r.failed for r in results)
    assert results[0].reason.startswith("reward_error: CriticFormatError: the critic gave no valid verdict in 6 comparisons")
    assert "'Response A is better!'" in results[0].reason


def test_bad_settings_and_rubric_files_name_the_cause(tmp_path):
    with pytest.raises(RubricError, match=r"rubric file .*missing\.md does not exist"):
        RubricSettings.from_spec({"rubrics": str(tmp_path / "missing.md")})
    (tmp_path / "empty.md").write_text("\n  \n")
    with pytest.raises(RubricError, match=r"rubric file .*empty\.md is empty"):
        RubricSettings.from_spec({"rubrics": f"core,{tmp_path / 'empty.md'}"})
    with pytest.raises(ValueError, match=r"reward_spec\['aggregation'\] must be win_rate or bradley_terry"):
        RubricSettings.from_spec({"aggregation": "elo"})
    with pytest.raises(ValueError, match=r"'rubric' scores groups"):
        RubricSettings.from_spec({"verifier": "rubric"})
    with pytest.raises(ConfigError, match=r"reward.critic.rubric: rubric file .*nope\.md does not exist"):
        load_config(None, [f"reward.critic.rubric={tmp_path / 'nope.md'}"])


def test_the_critic_task_reward_checks_the_verdict_against_the_gold_one():
    task = Task("c", ({"role": "user", "content": "compare"},), "critique", "critic_verdict", {"gold": "B"})
    assert critic_verdict_reward(task, "B boxes the right sum.\nVERDICT: B").score == 1.0
    assert critic_verdict_reward(task, "VERDICT: A").reason == "critic_disagrees"
    assert critic_verdict_reward(task, "B").reason == "critic_invalid"
    with pytest.raises(ValueError, match=r"reward_spec\['gold'\] must be A, B or TIE"):
        critic_verdict_reward(Task("c", (), "critique", "critic_verdict", {}), "VERDICT: A")
