"""vLLM worker extension: the engine's end of weight sync (`rl/weight_sync/transport.py`).

Updates are copies into the engine's own parameters through the model's weight loaders
(`model.load_weights`), which fuse q/k/v and gate/up and take just this worker's
tensor-parallel shard. That needs every linear layer to keep its weight as a plain tensor:
on CPU, vLLM instead packs each weight for its fast kernels (oneDNN) once at load time and
drops the plain copy, and rebuilding a layer from the checkpoint loader on every update costs
many times the copy itself. So before the first update, `k2rl_keep_plain_weights` gives those
layers their plain weight back, and at start and after each update `k2rl_pack_weights` packs them
again from the plain weights: updates stay copies, and generation keeps the packed kernels (about
twice as fast as torch's linear on the plain weights, at the price of a second copy of the weights
in memory). On GPU there is nothing to pack.

A oneDNN layer is packed again into the handle vLLM gave it at load: the handle's pointer, which
vLLM keeps in a tensor so that a compiled model reads it at every call, is swapped in place. A
compiled CPU model (`rollout.enforce_eager=false`) therefore runs on the new weights too; it was
compiled around that handle, and a new one would never reach it. The AMX kernel for 16-bit weights
keeps its packed weight in the closure of the layer's `cpu_linear` instead, which the compiled
model reads at every call: packing gives the layer a new one, and the engine packs at start so
that no layer is left with torch's plain linear, which has no such closure.
"""

from __future__ import annotations

import torch

from rl.weight_sync.transport import BucketPlan, BucketViews

# The primitive cache size vLLM packs its CPU linear layers with (model_executor/layers/utils.py).
_ONEDNN_PRIMITIVE_CACHE = 32


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
            if _onednn_handle(layer) is None:
                # Another packed kernel: plain torch linear until `k2rl_pack_weights` dispatches anew.
                # The AMX kernel vLLM uses for 16-bit weights keeps the bias in float32, which torch's
                # linear does not take beside a bfloat16 weight.
                layer.cpu_linear = torch.nn.functional.linear
                if getattr(layer, "bias", None) is not None:
                    layer.bias.data = layer.bias.data.to(layer.weight.dtype)
            changed += 1
        if changed and reload_from_disk:
            self.model_runner.reload_weights()
        return changed

    def k2rl_pack_weights(self) -> int:
        """Pack the plain weights for vLLM's CPU kernels, keeping the plain ones for the next update;
        returns the layers packed. Call after an update has fully arrived."""
        from vllm import _custom_ops as ops
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        packed = 0
        for layer in self.model_runner.get_model().modules():
            if not getattr(layer, "_cpu_skip_gemm_dispatch", False):
                continue
            if not packed:
                # vLLM's AMX kernel for 16-bit weights assumes that this process may use AMX tiles,
                # which Linux grants on request. oneDNN asks at its first AMX product; packed layers
                # that run before any (an engine that read its weights from disk) die of SIGILL.
                torch._C._cpu._init_amx()
            handle = _onednn_handle(layer)
            if handle is None:
                dispatch_cpu_unquantized_gemm(layer, remove_weight=False)
            else:
                # vLLM's own packing call; the fresh handle takes the old pointer and frees it.
                fresh = ops.create_onednn_mm(layer.weight.t(), _ONEDNN_PRIMITIVE_CACHE)
                old_pointer = handle.handler_tensor.clone()
                handle.handler_tensor.copy_(fresh.handler_tensor)
                fresh.handler_tensor.copy_(old_pointer)
                del fresh
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


def _onednn_handle(layer: torch.nn.Module):
    """The oneDNN handle that the layer's packed kernel calls (vLLM keeps it in the kernel's
    closure), or None for any other kernel."""
    from vllm._custom_ops import CPUDNNLGEMMHandler

    cells = getattr(getattr(layer, "cpu_linear", None), "__closure__", None) or ()
    return next((cell.cell_contents for cell in cells if isinstance(cell.cell_contents, CPUDNNLGEMMHandler)), None)
