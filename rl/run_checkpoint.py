"""Run checkpoints: everything a run needs to continue exactly where it stopped.

    RUN_DIR/checkpoints/step-000050/
        trainer/        sharded parameters and optimizer state (torch.distributed.checkpoint), per-rank RNG
        loop.json       step, weight version, sampler position and RNG, the driver's RNGs, reward-error
                        counts, the partial-rollout buffer, and the model's fingerprint
        metrics.jsonl   the metric rows written up to this step
        manifest.json   every file above with its size (and digest, for small files); written last

A checkpoint is written into a `.tmp-` folder beside the others and renamed into place when
complete, so a crash mid-write leaves the previous checkpoint as the latest. On resume, a
checkpoint whose files do not match its manifest is skipped for the one before it, and the log
says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_PREFIX = "step-"
_STAGING = ".tmp-"
# Files up to this size are checked by digest, larger ones (trainer shards) by size alone.
_DIGEST_LIMIT = 64 * 2**20


class CheckpointError(ValueError):
    """No usable checkpoint, or one that does not fit this run; the message names the folder."""


@dataclass
class LoopState:
    step: int
    weight_version: int
    sampler: dict[str, Any]
    rng: dict[str, Any]
    reward_errors: int
    responses_scored: int
    # The model the run trains (architecture and parameter shapes), to refuse another model's checkpoint.
    model_fingerprint: str
    partial_buffer: list[dict[str, Any]] = field(default_factory=list)
    ptx: dict[str, Any] = field(default_factory=dict)
    environment_errors: int = 0
    episodes_played: int = 0


def driver_rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    return {"python": [version, list(internal), gauss], "torch": torch.get_rng_state().tolist()}


def restore_driver_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def model_fingerprint(model_path: str) -> str:
    """A digest of the model's parameter names and shapes: equal for the same architecture and size.
    Read from the config alone (the model is built on the meta device), so a checkpoint of another
    model is refused before any process starts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    text = json.dumps([(name, list(tensor.shape)) for name, tensor in model.state_dict().items()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class RunCheckpoints:
    def __init__(self, run_dir: Path, keep: int):
        self.root = run_dir / "checkpoints"
        self.keep = keep

    def staging(self, step: int) -> Path:
        """An empty folder to write step `step`'s checkpoint into (readable by every node's trainer ranks)."""
        path = self.root / f"{_STAGING}{_PREFIX}{step:06d}"
        shutil.rmtree(path, ignore_errors=True)
        (path / "trainer").mkdir(parents=True)
        return path

    def commit(self, staging: Path, state: LoopState, metrics_file: Path) -> Path:
        """Finish a staged checkpoint: loop state, metrics, manifest, then the atomic rename."""
        (staging / "loop.json").write_text(json.dumps(asdict(state)))
        if metrics_file.is_file():
            shutil.copyfile(metrics_file, staging / "metrics.jsonl")
        manifest = {str(path.relative_to(staging)): _describe(path) for path in sorted(staging.rglob("*")) if path.is_file()}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
        _fsync_tree(staging)
        final = self.root / f"{_PREFIX}{state.step:06d}"
        shutil.rmtree(final, ignore_errors=True)
        os.rename(staging, final)
        # Only older ones go: a newer one left by a resume from an earlier checkpoint is no reason
        # to delete the one just written.
        older = [path for path in self.completed() if path.name < final.name]
        for old in older[: max(len(older) - (self.keep - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def completed(self) -> list[Path]:
        """Renamed-into-place checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))

    def latest(self) -> tuple[Path, LoopState]:
        """The newest checkpoint whose files match its manifest; older ones stand in for broken ones."""
        for leftover in (self.root.glob(f"{_STAGING}*") if self.root.is_dir() else []):
            log.warning("ignoring %s: a checkpoint that was never finished", leftover)
        for path in reversed(self.completed()):
            problem = _verify(path)
            if problem is None:
                return path, LoopState(**json.loads((path / "loop.json").read_text()))
            log.warning("checkpoint %s is unusable (%s); trying the one before it", path, problem)
        raise CheckpointError(f"no usable checkpoint in {self.root}")


def _describe(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    entry: dict[str, Any] = {"bytes": size}
    if size <= _DIGEST_LIMIT:
        entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entry


def _verify(path: Path) -> str | None:
    """None if every file of the manifest is there as described, else what is wrong."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as error:
        return f"manifest.json unreadable: {error}"
    for name, expected in manifest.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if _describe(file) != expected:
            return f"{name} does not match the manifest"
    try:
        LoopState(**json.loads((path / "loop.json").read_text()))
    except (OSError, ValueError, TypeError) as error:
        return f"loop.json unreadable: {error}"
    return None


def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
        descriptor = os.open(path, flags)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
