"""The `rubric` reward: K2's self-critique (§3.2.2). The critic compares a group's K responses in
pairs against rubrics, and the verdicts become each response's score in [0, 1].

    K responses -> pairs (all pairs, or each against an anchor) -> each pair judged in both orders
    -> verdicts ("VERDICT: A" / "VERDICT: B" / "VERDICT: TIE" as the reply's last line)
    -> win rate or Bradley-Terry -> scores, optionally mixed with a verifiable reward

Rubric texts are files a user can read and replace (rewards/rubrics/): K2's core rubrics
(`core`), its prescriptive rubrics against reward hacking (`prescriptive`), and `compact`, short
enough for the embedded policy's context. A task may add a rubric of its own (`rubric`, text).

`reward_spec` (every key optional; each has the default shown):
- `rubrics`: "core,prescriptive" — built-in rubric names or paths of rubric files, comma-separated
  (or a list)
- `rubric`: "" — a rubric written for this prompt, added after the files'
- `schedule`: "anchor" — "anchor" (each response against the first: 2(K-1) comparisons) or
  "all_pairs" (K(K-1) comparisons)
- `aggregation`: "bradley_terry" — or "win_rate"
- `max_tokens`: 256 — the critic's reply length per comparison
- `verifier`: "" — a registered per-response reward (for example "math", which reads this
  reward_spec) scored beside the critic: mixed in by the weights, and measured against the
  critic's verdicts (`critic_verifier_agreement`)
- `rubric_weight`: 1.0, `verifier_weight`: 0.0 — score = weighted mean of the two

A verdict in any other format counts for neither side and is counted (`critic_invalid_frac`); a
critic that gives no valid verdict for a whole group fails the group's reward (counted as a reward
error, with the reason). The two orders of a pair disagreeing is counted too
(`critic_position_bias`). Each result's `components` carry the group's counts (`CriticStats`),
which the loop sums over the step's groups.

Also here: `critic_verdict`, the reward of critic-refinement tasks (rl/critique.py): 1 when the
verdict is the gold one that the verifier's scores give.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any

from rewards.registry import RewardContext, get_reward, group_reward, is_group_reward, register
from rl.records import RewardResult, Task

RUBRICS_DIR = Path(__file__).parent / "rubrics"

COMPARISON_TEMPLATE = (
    "{rubric}\n\nQuestion: {prompt}\n\nResponse A: {first}\n\nResponse B: {second}\n\n"
    "Which response is better? End with VERDICT: A, VERDICT: B or VERDICT: TIE."
)

_VERDICT_LINE = re.compile(r"VERDICT: (A|B|TIE)")


class RubricError(ValueError):
    """A rubric or pattern file that is missing, empty or malformed; the message names the file."""


class CriticFormatError(RuntimeError):
    """The critic gave no reply in the required format for a whole group."""


class Verdict(str, Enum):
    A = "A"
    B = "B"
    TIE = "TIE"


def parse_verdict(reply: str) -> Verdict | None:
    """The verdict on the reply's last non-empty line, exactly `VERDICT: A|B|TIE`; None otherwise."""
    lines = [line.strip() for line in reply.splitlines() if line.strip()]
    match = _VERDICT_LINE.fullmatch(lines[-1]) if lines else None
    return Verdict(match.group(1)) if match else None


def rubric_path(name_or_path: str) -> Path:
    """A built-in rubric's file (a bare name such as "core"), or the given path."""
    if "/" not in name_or_path and "." not in name_or_path:
        return RUBRICS_DIR / f"{name_or_path}.md"
    return Path(name_or_path)


def read_text_file(path: Path, what: str) -> str:
    """A rubric or pattern file's text; missing or empty is a RubricError naming the file."""
    if not path.is_file():
        builtin = ", ".join(sorted(p.stem for p in RUBRICS_DIR.glob("*.md")))
        raise RubricError(f"{what} file {path} does not exist (built-in rubrics: {builtin})")
    text = path.read_text().strip()
    if not text:
        raise RubricError(f"{what} file {path} is empty")
    return text


def load_rubric(name_or_path: str) -> str:
    return read_text_file(rubric_path(name_or_path), "rubric")


def rubric_names(value: Any, key: str) -> tuple[str, ...]:
    """A comma-separated string or a list of rubric names/paths, as a tuple; `key` names it in errors."""
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{key} must be a comma-separated string or a list of rubric names, got {value!r}")
    return tuple(n.strip() for n in names if n.strip())


def prompt_text(task: Task) -> str:
    """What the responses answer: the user's message, or the whole conversation when there are several."""
    messages = list(task.messages)
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def comparison_messages(prompt: str, first: str, second: str, rubric: str) -> list[dict[str, str]]:
    """The critic's conversation for one comparison: `first` shown as A, `second` as B."""
    content = COMPARISON_TEMPLATE.format(rubric=rubric, prompt=prompt, first=first.strip(), second=second.strip())
    return [{"role": "user", "content": content}]


def comparison_pairs(count: int, schedule: str) -> list[tuple[int, int]]:
    """The pairs of responses to compare (each is then judged in both orders)."""
    if schedule == "all_pairs":
        return [(i, j) for i in range(count) for j in range(i + 1, count)]
    if schedule == "anchor":
        return [(0, j) for j in range(1, count)]
    raise ValueError(f"schedule must be anchor or all_pairs, got {schedule!r}")


_OUTCOME = {Verdict.A: 1.0, Verdict.B: 0.0, Verdict.TIE: 0.5}


@dataclass(frozen=True)
class PairJudgement:
    """One pair judged in both orders: `forward` shows `first` as A, `backward` shows `second` as A
    (None: that reply was invalid)."""

    first: int
    second: int
    forward: Verdict | None
    backward: Verdict | None

    def outcomes(self) -> list[float]:
        """`first`'s result in each valid verdict: 1 a win, 0.5 a tie, 0 a loss."""
        results = []
        if self.forward is not None:
            results.append(_OUTCOME[self.forward])
        if self.backward is not None:
            results.append(1.0 - _OUTCOME[self.backward])
        return results

    @property
    def both_valid(self) -> bool:
        return self.forward is not None and self.backward is not None

    @property
    def order_dependent(self) -> bool:
        """Both orders gave a valid verdict, and they disagree: the critic followed the position."""
        outcomes = self.outcomes()
        return self.both_valid and outcomes[0] != outcomes[1]

    def preference(self) -> float | None:
        """`first`'s result when both orders agree on it; None when either is invalid or they disagree."""
        return self.outcomes()[0] if self.both_valid and not self.order_dependent else None


def win_rates(count: int, judgements: Sequence[PairJudgement]) -> list[float]:
    """Each response's share of its valid verdicts won (a tie is half a win); 0.5 without any."""
    won, played = [0.0] * count, [0] * count
    for judgement in judgements:
        for outcome in judgement.outcomes():
            won[judgement.first] += outcome
            won[judgement.second] += 1.0 - outcome
            played[judgement.first] += 1
            played[judgement.second] += 1
    return [w / n if n else 0.5 for w, n in zip(won, played)]


def bradley_terry(count: int, judgements: Sequence[PairJudgement], iterations: int = 200) -> list[float]:
    """Bradley-Terry strengths fitted by minorise-maximise iterations (Hunter 2004), each response's
    score being its mean chance of beating each other response under the fit.

    A tie counts half a win to each side, and each compared pair gets one virtual tie, which keeps
    every strength finite when a response wins (or loses) all its comparisons; a response with no
    valid verdict stays at 0.5.
    """
    wins = [[0.0] * count for _ in range(count)]  # wins[i][j]: i's wins over j
    for judgement in judgements:
        i, j = judgement.first, judgement.second
        outcomes = judgement.outcomes()
        if not outcomes:
            continue
        for outcome in [*outcomes, 0.5]:
            wins[i][j] += outcome
            wins[j][i] += 1.0 - outcome
    games = [[wins[i][j] + wins[j][i] for j in range(count)] for i in range(count)]
    compared = [i for i in range(count) if any(games[i])]
    strength = [1.0] * count
    for _ in range(iterations):
        updated = list(strength)
        for i in compared:
            denominator = sum(games[i][j] / (strength[i] + strength[j]) for j in range(count) if games[i][j])
            updated[i] = sum(wins[i]) / denominator
        total = sum(updated[i] for i in compared)
        strength = [s * len(compared) / total if i in compared else s for i, s in enumerate(updated)]
    scores = []
    for i in range(count):
        rivals = [j for j in compared if j != i]
        if i not in compared or not rivals:
            scores.append(0.5)
        else:
            scores.append(sum(strength[i] / (strength[i] + strength[j]) for j in rivals) / len(rivals))
    return scores


AGGREGATIONS = {"win_rate": win_rates, "bradley_terry": bradley_terry}


@dataclass(frozen=True)
class CriticStats:
    """How a critic's verdicts went, as counts that add up over groups and steps."""

    comparisons: int = 0
    invalid: int = 0
    # Pairs with a valid verdict in both orders, and how many of those disagree between the orders.
    pairs_judged: int = 0
    order_dependent: int = 0
    # Pairs whose verifier scores differ, and how many of those the critic decided for the verifier's
    # winner in both orders.
    verifier_pairs: int = 0
    verifier_agreements: int = 0

    @classmethod
    def of(cls, judgements: Sequence[PairJudgement], verifier_scores: Sequence[float] | None) -> CriticStats:
        verdicts = [v for j in judgements for v in (j.forward, j.backward)]
        decided = [(j, better_of(verifier_scores, j.first, j.second)) for j in judgements] if verifier_scores else []
        decided = [(j, better) for j, better in decided if better is not None]
        return cls(
            comparisons=len(verdicts),
            invalid=sum(v is None for v in verdicts),
            pairs_judged=sum(j.both_valid for j in judgements),
            order_dependent=sum(j.order_dependent for j in judgements),
            verifier_pairs=len(decided),
            verifier_agreements=sum(j.preference() == (1.0 if better == j.first else 0.0) for j, better in decided),
        )

    def __add__(self, other: CriticStats) -> CriticStats:
        return CriticStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def as_components(self) -> dict[str, float]:
        return {f"critic_{f.name}": float(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_components(cls, components: Mapping[str, float]) -> CriticStats | None:
        """The counts a rubric result carries, or None for a result of another reward."""
        if "critic_comparisons" not in components:
            return None
        return cls(*(int(components[f"critic_{f.name}"]) for f in fields(cls)))

    def metrics(self) -> dict[str, float]:
        """The step's critic metrics (a share is left out when nothing was there to count)."""
        shares = {
            "critic_invalid_frac": (self.invalid, self.comparisons),
            "critic_position_bias": (self.order_dependent, self.pairs_judged),
            "critic_verifier_agreement": (self.verifier_agreements, self.verifier_pairs),
        }
        return {key: part / whole for key, (part, whole) in shares.items() if whole}


def better_of(scores: Sequence[float], first: int, second: int) -> int | None:
    """Which of two responses the scores prefer; None on equal scores."""
    if scores[first] == scores[second]:
        return None
    return first if scores[first] > scores[second] else second


@dataclass(frozen=True)
class RubricSettings:
    """The `rubric` reward's settings, read from a task's reward_spec (see the module docstring)."""

    rubrics: tuple[str, ...] = ("core", "prescriptive")
    rubric: str = ""
    schedule: str = "anchor"
    aggregation: str = "bradley_terry"
    max_tokens: int = 256
    verifier: str = ""
    rubric_weight: float = 1.0
    verifier_weight: float = 0.0

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> RubricSettings:
        """Validated settings; a bad value raises ValueError naming its reward_spec key, a missing or
        empty rubric file RubricError naming the file."""
        settings = cls(
            rubrics=rubric_names(spec.get("rubrics", cls.rubrics), "reward_spec['rubrics']"),
            rubric=str(spec.get("rubric", "")),
            schedule=str(spec.get("schedule", cls.schedule)),
            aggregation=str(spec.get("aggregation", cls.aggregation)),
            max_tokens=_number(spec, "max_tokens", cls.max_tokens, int),
            verifier=str(spec.get("verifier", "")),
            rubric_weight=_number(spec, "rubric_weight", cls.rubric_weight, float),
            verifier_weight=_number(spec, "verifier_weight", cls.verifier_weight, float),
        )
        comparison_pairs(2, settings.schedule)
        if settings.aggregation not in AGGREGATIONS:
            raise ValueError(f"reward_spec['aggregation'] must be {' or '.join(AGGREGATIONS)}, got {settings.aggregation!r}")
        if settings.max_tokens <= 0:
            raise ValueError(f"reward_spec['max_tokens'] must be > 0, got {settings.max_tokens}")
        if settings.rubric_weight < 0 or settings.verifier_weight < 0 or settings.rubric_weight + settings.verifier_weight == 0:
            raise ValueError("reward_spec['rubric_weight'] and ['verifier_weight'] must be >= 0 and not both 0")
        if settings.verifier_weight and not settings.verifier:
            raise ValueError("reward_spec['verifier_weight'] is set but reward_spec['verifier'] names no reward")
        if settings.verifier and is_group_reward(get_reward(settings.verifier)):
            raise ValueError(f"reward_spec['verifier'] must be a per-response reward; {settings.verifier!r} scores groups")
        if not settings.rubrics and not settings.rubric:
            raise ValueError("reward_spec['rubrics'] names no rubric and reward_spec['rubric'] is empty")
        settings.rubric_text()
        return settings

    def rubric_text(self) -> str:
        """The rubric files' texts, then this prompt's own rubric."""
        return "\n\n".join([*(load_rubric(name) for name in self.rubrics), *([self.rubric.strip()] if self.rubric.strip() else [])])

    def verifier_scores(self, task: Task, responses: Sequence[str]) -> list[float] | None:
        if not self.verifier:
            return None
        verify = get_reward(self.verifier)
        return [verify(task, response).score for response in responses]


def _number(spec: Mapping[str, Any], key: str, default: float, kind: type) -> Any:
    value = spec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ValueError(f"reward_spec[{key!r}] must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


async def judge_pairs(context: RewardContext, prompt: str, responses: Sequence[str], pairs: Sequence[tuple[int, int]],
                      rubric: str, max_tokens: int) -> tuple[list[PairJudgement], list[str]]:
    """Every pair judged in both orders, all in one batch of critic requests; returns the judgements
    and the critic's replies (forward and backward of each pair, in turn)."""
    conversations = [comparison_messages(prompt, responses[a], responses[b], rubric)
                     for i, j in pairs for a, b in ((i, j), (j, i))]
    replies = await context.generate(conversations, max_tokens) if conversations else []
    verdicts = [parse_verdict(reply) for reply in replies]
    judgements = [PairJudgement(i, j, verdicts[2 * n], verdicts[2 * n + 1]) for n, (i, j) in enumerate(pairs)]
    return judgements, replies


@register("rubric")
@group_reward
async def rubric_reward(task: Task, responses: list[str], context: RewardContext) -> list[RewardResult]:
    settings = RubricSettings.from_spec(task.reward_spec)
    pairs = comparison_pairs(len(responses), settings.schedule)
    judgements, replies = await judge_pairs(context, prompt_text(task), responses, pairs, settings.rubric_text(), settings.max_tokens)
    if replies and all(parse_verdict(reply) is None for reply in replies):
        raise CriticFormatError(
            f"the critic gave no valid verdict in {len(replies)} comparisons (its reply must end with a line "
            f"'VERDICT: A', 'VERDICT: B' or 'VERDICT: TIE'); its last reply ended {replies[-1][-80:]!r}"
        )
    rubric_scores = AGGREGATIONS[settings.aggregation](len(responses), judgements)
    verifier_scores = settings.verifier_scores(task, responses)
    stats = CriticStats.of(judgements, verifier_scores).as_components()
    total_weight = settings.rubric_weight + settings.verifier_weight
    results = []
    for index, rubric_score in enumerate(rubric_scores):
        components = {"rubric": rubric_score, **stats}
        score = rubric_score
        if verifier_scores is not None:
            components["verifier"] = verifier_scores[index]
            score = (settings.rubric_weight * rubric_score + settings.verifier_weight * verifier_scores[index]) / total_weight
        results.append(RewardResult(score, f"rubric: {settings.aggregation} {rubric_score:.2f}", components))
    return results


@register("critic_verdict")
def critic_verdict_reward(task: Task, response: str) -> RewardResult:
    """1 when the critic's verdict is reward_spec["gold"] (A, B or TIE), else 0."""
    gold = task.reward_spec.get("gold")
    if gold not in {v.value for v in Verdict}:
        raise ValueError(f"task {task.task_id!r}: reward_spec['gold'] must be A, B or TIE, got {gold!r}")
    verdict = parse_verdict(response)
    if verdict is None:
        return RewardResult(0.0, "critic_invalid")
    return RewardResult(1.0, "critic_agrees") if verdict.value == gold else RewardResult(0.0, "critic_disagrees")
