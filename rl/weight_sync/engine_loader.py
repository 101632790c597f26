"""vLLM worker extension: the engine's end of weight sync (`rl/weight_sync/transport.py`).

Updates are copies into the engine's own parameters through the model's weight loaders
(`model.load_weights`), which fuse q/k/v and gate/up and take just this worker's
tensor-parallel shard. That needs every linear layer to keep its weight as a plain tensor:
on CPU, vLLM instead packs each weight for its fast kernels (oneDNN) once at load time and
drops the plain copy, and rebuilding a layer from the checkpoint loader on every update costs
many times the copy itself. So before the first update, `k2rl_keep_plain_weights` gives those
layers their plain weight back, and after each update `k2rl_pack_weights` packs them again from
the plain weights: updates stay copies, and generation keeps the packed kernels (about twice as
fast as torch's linear on the plain weights, at the price of a second copy of the weights in
memory). On GPU there is nothing to pack.
"""

from __future__ import annotations

import torch

from rl.weight_sync.transport import BucketPlan, BucketViews


class WeightSyncLoader:
    """Mixed into each vLLM worker through `worker_extension_cls`; called with `collective_rpc`.

    Method names carry a `k2rl_` prefix so they never shadow vLLM's own weight-transfer API.
    """

    def k2rl_packed_modules(self) -> dict[str, list[str]]:
        """Which checkpoint modules this model fuses into one (`qkv_proj`: q/k/v_proj, ...)."""
        mapping = getattr(self.model_runner.get_model(), "packed_modules_mapping", {}) or {}
        return {fused: list(parts) for fused, parts in mapping.items()}

    def k2rl_keep_plain_weights(self, reload_from_disk: bool) -> int:
        """Undo vLLM's CPU weight packing (see the module docstring); returns the layers changed.
        Their values are undefined until the next full update, or until they are read from the
        checkpoint again (`reload_from_disk`)."""
        from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
        from vllm.model_executor.model_loader.reload.meta import materialize_layer, restore_layer_on_meta

        changed = 0
        for layer in self.model_runner.get_model().modules():
            if getattr(layer, "cpu_linear", torch.nn.functional.linear) is torch.nn.functional.linear:
                continue
            if layer.weight.numel() == 0:  # packed, and the plain copy dropped
                info = get_layerwise_info(layer)
                restore_layer_on_meta(layer, info)
                materialize_layer(layer, info)
            # vLLM would otherwise pack (and drop) the weight again after each load.
            layer._cpu_skip_gemm_dispatch = True
            layer.cpu_linear = torch.nn.functional.linear
            changed += 1
        if changed and reload_from_disk:
            self.model_runner.reload_weights()
        return changed

    def k2rl_pack_weights(self) -> int:
        """Pack the plain weights for vLLM's CPU kernels, keeping the plain ones for the next update;
        returns the layers packed. Call after an update has fully arrived."""
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        packed = 0
        for layer in self.model_runner.get_model().modules():
            if getattr(layer, "_cpu_skip_gemm_dispatch", False):
                dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
                packed += 1
        return packed

    def k2rl_attach_plan(self, plan: dict, node_id: str) -> None:
        previous = getattr(self, "_k2rl_mapped", None)
        if previous is not None:
            previous.close()
        self._k2rl_mapped = BucketViews(BucketPlan.from_dict(plan), node_id)

    def k2rl_load_bucket(self, index: int) -> None:
        tensors = self._k2rl_mapped.bucket(index)
        try:
            self.model_runner.get_model().load_weights(iter(tensors))
        finally:
            tensors.clear()
