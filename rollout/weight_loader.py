"""vLLM worker extension: the engine's end of the checkpoint engine (`rl/checkpoint_engine.py`)."""

from __future__ import annotations

import logging
from contextlib import contextmanager

from rl.checkpoint_engine import BucketPlan, MappedPlan


class CheckpointEngineLoader:
    """Mixed into each vLLM worker through `worker_extension_cls`; called with `collective_rpc`.

    Method names carry a `k2rl_` prefix so they never shadow vLLM's own weight-transfer API.
    """

    def k2rl_packed_modules(self) -> dict[str, list[str]]:
        """Which checkpoint modules this model fuses into one (`qkv_proj`: q/k/v_proj, ...)."""
        mapping = getattr(self.model_runner.get_model(), "packed_modules_mapping", {}) or {}
        return {fused: list(parts) for fused, parts in mapping.items()}

    def k2rl_attach_plan(self, plan: dict) -> None:
        previous = getattr(self, "_k2rl_mapped", None)
        if previous is not None:
            previous.close()
        self._k2rl_mapped = MappedPlan(BucketPlan.from_dict(plan))

    def k2rl_load_bucket(self, index: int) -> None:
        # reload_weights copies into the engine's own (possibly repacked) parameters, and each
        # worker's weight loaders take just their tensor-parallel shard of the full tensors.
        tensors = self._k2rl_mapped.bucket(index)
        try:
            with _quiet_partial_reload():
                self.model_runner.reload_weights(weights_iterator=iter(tensors))
        finally:
            tensors.clear()


@contextmanager
def _quiet_partial_reload():
    """A bucket holds only some of the model's modules; vLLM warns about every other one."""
    names = ("vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
