"""Run outputs a person reads: metrics.jsonl, TensorBoard events and the reward plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402


class MetricsLogger:
    """Appends one row per step to metrics.jsonl and TensorBoard. `resumed_at` (a resumed run's
    checkpoint step) keeps the rows up to it and drops TensorBoard's events after it."""

    def __init__(self, run_dir: Path, resumed_at: int | None = None):
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        purge = None if resumed_at is None else resumed_at + 1
        self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)
        self.rows: list[dict[str, Any]] = []
        if resumed_at is not None and self.path.is_file():
            self.rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.path.open("a") as file:
            file.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, global_step=row["step"])
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
        if self.rows:
            plot_rewards(self.rows, self.run_dir / "reward.png")


def plot_rewards(rows: list[dict[str, Any]], out_path: Path) -> None:
    """Training reward and held-out accuracy against step, on one figure."""
    figure, axis = plt.subplots(figsize=(7, 4))
    reward = [(r["step"], r["reward_mean"]) for r in rows if "reward_mean" in r]
    accuracy = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    if reward:
        axis.plot(*zip(*reward), label="train reward (mean)", color="tab:blue", alpha=0.8)
    if accuracy:
        axis.plot(*zip(*accuracy), label="held-out accuracy (greedy)", color="tab:orange", marker="o")
    axis.set_xlabel("step")
    axis.set_ylabel("reward / accuracy")
    # Rewards may leave [0, 1] (a negative budget penalty, a length reward): the axis follows them.
    values = [value for _, value in reward + accuracy]
    axis.set_ylim(min([0.0, *values]) - 0.05, max([1.0, *values]) + 0.05)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(out_path, dpi=120)
    plt.close(figure)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl rows; one line naming the file when it is missing."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no metrics.jsonl)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_runs(runs: dict[str, Path], metric: str, out_path: Path, x: str = "step") -> None:
    """One metric of several runs on one figure, against `x` ("step", or "minutes" of RL: the
    running sum of time_step_s), each run labelled with its key."""
    figure, axis = plt.subplots(figsize=(7, 4))
    for label, run_dir in runs.items():
        rows = read_metrics(run_dir)
        if not any(metric in row for row in rows):
            raise ValueError(f"{run_dir}/metrics.jsonl has no {metric!r}")
        elapsed, points = 0.0, []
        for row in rows:
            elapsed += row.get("time_step_s", 0.0)
            if metric in row:
                points.append((elapsed / 60 if x == "minutes" else row["step"], row[metric]))
        axis.plot(*zip(*points), label=label, marker="o" if len(points) < 40 else None, markersize=3)
    axis.set_xlabel("minutes of RL" if x == "minutes" else "step")
    axis.set_ylabel(metric)
    axis.grid(alpha=0.3)
    axis.legend(loc="best", fontsize=8)
    figure.tight_layout()
    figure.savefig(out_path, dpi=120)
    plt.close(figure)
