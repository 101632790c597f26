"""vLLM worker extension: reload the model's weights in place from the trainer's shared-memory block."""

from __future__ import annotations

from rl.weight_sync import WeightManifest, mapped_weights


class SharedMemoryWeightLoader:
    """Mixed into each vLLM worker through `worker_extension_cls`; called with `collective_rpc`.

    Method names carry a `k2rl_` prefix so they never shadow vLLM's own weight-transfer API.
    """

    def k2rl_load_shared_weights(self, manifest: dict) -> int:
        parsed = WeightManifest.from_dict(manifest)
        with mapped_weights(parsed) as tensors:
            # reload_weights copies into the engine's (possibly repacked) parameters,
            # so the views into shared memory are no longer needed afterwards.
            self.model_runner.reload_weights(weights_iterator=iter(tensors))
        return parsed.version
