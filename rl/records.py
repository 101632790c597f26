"""Typed records that pass between the loop's components.

This module is the bottom of the import graph: it imports nothing from k2rl, and the data
sources, the rollout layer, the rewards and the trainer all import it. The records carry token
ids and numbers, never weights, so they are cheap to ship between Ray processes.

    Task          what to ask: prompt messages (or an environment that supplies them), the reward
                  that scores the answer and what it needs
    Trajectory    one episode as the engines produced it, token by token: what the policy generated
                  (loss mask 1) and what the environment and chat template appended (loss mask 0),
                  with each generated token's logprob, weight version and sampling temperature
    RewardResult  a reward module's verdict on one episode
    TrainSample   what the trainer needs of one trajectory: tokens, masks, rollout logprobs and
                  temperatures, and its advantage
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


@dataclass(frozen=True)
class Task:
    """One prompt, or one environment episode, and what its reward needs.

    `task_type` selects the token budget. `reward` names the registered reward that scores the
    final assistant message ("" means: the sum of the environment's step rewards), `reward_spec`
    holds what that reward needs (for `math`: `answer`). `env` names a registered environment
    ("" is the single-turn case: `messages` is the prompt, one response ends the episode).
    """

    task_id: str
    messages: tuple[dict[str, str], ...]
    task_type: str
    reward: str
    reward_spec: dict[str, Any] = field(default_factory=dict)
    env: str = ""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    # Easy (low) to hard (high), for curriculum sampling; None when the source gives none.
    difficulty: float | None = None


@dataclass(frozen=True)
class RewardResult:
    """A reward module's verdict: `score` drives learning, `reason` explains it.

    `error` is set when the reward raised: the score then means nothing, and the trajectory is
    masked out of the loss and left out of its group's baseline.
    """

    score: float
    reason: str
    components: dict[str, float] = field(default_factory=dict)
    error: str = ""

    @property
    def failed(self) -> bool:
        return bool(self.error)


class EpisodeStatus(str, Enum):
    COMPLETED = "completed"  # the policy ended its last turn, or the environment ended the episode
    TRUNCATED = "truncated"  # cut at a token budget or the turn limit (K2 budget control)
    PARTIAL = "partial"  # paused by the per-iteration generation budget; resumes in a later step
    FAILED = "failed"  # the environment raised, hung or answered malformed; `error` says why


@dataclass(frozen=True)
class Turn:
    """A span of `Trajectory.response_ids`: [start, end) written by `role` ("assistant" or "environment")."""

    role: str
    start: int
    end: int


@dataclass
class Trajectory:
    """One episode for one task, exactly as the engines produced it.

    `response_ids` holds everything after the first prompt: the policy's tokens and the
    environment's (rendered as the chat template's delta, never by re-tokenising earlier turns).
    `loss_mask`, `logprobs`, `versions` and `temperatures` run parallel to it; the last three are
    0.0, -1 and 0.0 where the mask is 0. Trajectories of one task's K samples share `group_id`.
    """

    task: Task
    group_id: str
    sample_index: int
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    temperatures: list[float] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    status: EpisodeStatus = EpisodeStatus.PARTIAL
    # The engine's reason for the last generation ("stop", "length", "abort"), or what ended the episode.
    finish_reason: str = ""
    # The final assistant message, as text: what a reward scores.
    response_text: str = ""
    messages: list[dict[str, str]] = field(default_factory=list)
    env_reward: float = 0.0
    reward: RewardResult | None = None
    error: str = ""
    # Prompt tokens sent with the episode's generation requests, and those of them the engine read
    # from its prefix cache (the group's shared prompt, the episode's earlier turns).
    request_prompt_tokens: int = 0
    cached_prompt_tokens: int = 0

    def append(self, role: str, token_ids: list[int], logprobs: list[float] | None = None,
               version: int = -1, temperature: float = 0.0) -> None:
        """Add a turn: generated tokens (with their logprobs) train, anything else is masked out."""
        generated = logprobs is not None
        start = len(self.response_ids)
        self.response_ids += token_ids
        self.loss_mask += [int(generated)] * len(token_ids)
        self.logprobs += list(logprobs) if generated else [0.0] * len(token_ids)
        self.versions += [version if generated else -1] * len(token_ids)
        self.temperatures += [temperature if generated else 0.0] * len(token_ids)
        if self.turns and self.turns[-1].role == role and self.turns[-1].end == start:
            self.turns[-1] = Turn(role, self.turns[-1].start, start + len(token_ids))
        else:
            self.turns.append(Turn(role, start, start + len(token_ids)))

    @property
    def truncated(self) -> bool:
        return self.status is EpisodeStatus.TRUNCATED

    @property
    def generated_tokens(self) -> int:
        return sum(self.loss_mask)

    @property
    def oldest_version(self) -> int:
        """The weight version of the earliest generated token (-1 before any)."""
        return min((v for v in self.versions if v >= 0), default=-1)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able copy (for the run checkpoint's partial-rollout buffer)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trajectory:
        fields = dict(data)
        fields["task"] = Task(**{**fields["task"], "messages": tuple(fields["task"]["messages"])})
        fields["turns"] = [Turn(**turn) for turn in fields["turns"]]
        fields["status"] = EpisodeStatus(fields["status"])
        fields["reward"] = RewardResult(**fields["reward"]) if fields["reward"] is not None else None
        return cls(**fields)

    @property
    def ended(self) -> bool:
        """Whether the episode ended with a response to score (not failed, not paused)."""
        return self.status in (EpisodeStatus.COMPLETED, EpisodeStatus.TRUNCATED)

    @property
    def trainable(self) -> bool:
        """Whether this episode can enter the loss: it ended and its reward did not fail."""
        return self.ended and self.reward is not None and not self.reward.failed


@dataclass
class TrainSample:
    """One trajectory as the trainer sees it. The per-token lists cover `token_ids[prompt_len:]`."""

    token_ids: list[int]
    prompt_len: int
    loss_mask: list[int]
    rollout_logprobs: list[float]
    temperatures: list[float]
    versions: list[int]
    advantage: float

    @classmethod
    def of(cls, trajectory: Trajectory, advantage: float, loss_mask: list[int] | None = None) -> TrainSample:
        return cls(
            token_ids=trajectory.prompt_ids + trajectory.response_ids,
            prompt_len=len(trajectory.prompt_ids),
            loss_mask=list(trajectory.loss_mask if loss_mask is None else loss_mask),
            rollout_logprobs=list(trajectory.logprobs),
            temperatures=list(trajectory.temperatures),
            versions=list(trajectory.versions),
            advantage=advantage,
        )
