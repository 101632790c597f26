"""`k2rl bench weight-sync`: full weight updates through weight sync, against a plain memory copy
of the same bytes in the same run.

A random Qwen2-architecture model of about `--params` parameters is made in this process, which
plays the weight-sync writer of a one-rank trainer (its gather is then the identity, so the
figures are those of the broadcast and the engines' in-place loads). The rollout engines are real
vLLM engines in Ray actors, started with `load_format="dummy"` so that no checkpoint is written or
read. Each figure is the best of `--repeats` rounds; a round times the memcpy, then an update into
one engine, then one into every engine.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from dataclasses import asdict, dataclass

import torch

from rl.weight_sync.transport import BucketWriter, WeightUpdate, layout_of, plan_buckets

VOCAB = 8192
LAYERS = 8


@dataclass
class Timing:
    seconds: float
    gb_per_s: float
    ratio_to_memcpy: float


@dataclass
class WeightSyncBench:
    params: int
    gigabytes: float
    buckets: int
    bucket_mb: float
    engines: int
    memcpy: Timing
    one_engine: Timing
    all_engines: Timing
    all_engines_vs_one: float

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        rows = [
            f"{self.params / 1e6:.0f} M parameters ({self.gigabytes:.2f} GB), {self.buckets} buckets of "
            f"<= {self.bucket_mb:g} MB",
            f"{'':24}{'seconds':>9}{'GB/s':>8}{'x memcpy':>10}",
        ]
        sides = [("memcpy", self.memcpy), ("update, 1 engine", self.one_engine)]
        if self.engines > 1:
            sides.append((f"update, {self.engines} engines", self.all_engines))
        for name, timing in sides:
            rows.append(f"{name:24}{timing.seconds:9.3f}{timing.gb_per_s:8.2f}{timing.ratio_to_memcpy:10.2f}")
        if self.engines > 1:
            rows.append(f"{self.engines} engines / 1 engine: {self.all_engines_vs_one:.2f}x")
        return "\n".join(rows)


def random_model_config(params: int):
    """A Qwen2 config of about `params` parameters: 8 layers, head size 64, MLP 3x hidden."""
    from transformers import Qwen2Config

    # Per layer about 4 h^2 (attention) + 9 h^2 (MLP); embedding and head 2 * vocab * h.
    a, b = 13 * LAYERS, 2 * VOCAB
    hidden = (-b + (b * b + 4 * a * params) ** 0.5) / (2 * a)
    hidden = max(128, int(round(hidden / 128)) * 128)
    return Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=LAYERS,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )


def _random_state(config) -> dict[str, torch.Tensor]:
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in Qwen2ForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}


def _memcpy(state: dict[str, torch.Tensor]):
    """A timed plain copy of every tensor into one preallocated buffer (the baseline)."""
    flat = [t.reshape(-1) for t in state.values()]
    target = torch.empty(sum(t.numel() for t in flat))

    def copy() -> float:
        start = time.perf_counter()
        offset = 0
        for tensor in flat:
            target[offset : offset + tensor.numel()].copy_(tensor)
            offset += tensor.numel()
        return time.perf_counter() - start

    copy()  # touches the target's pages: not part of the timing
    return copy


def run_weight_sync_bench(params: int, engines: int, bucket_mb: float, repeats: int = 3) -> WeightSyncBench:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from rl.bootstrap import BootstrapSpec, train_tokenizer
    from rl.cluster.ray_session import ray_session
    from rollout.engine import EngineSpec, RolloutEngine

    config = random_model_config(params)
    state = _random_state(config)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    total_params = sum(t.numel() for t in state.values())
    memcpy_once = _memcpy(state)

    actors, writer = [], None
    with ray_session():
        try:
            with tempfile.TemporaryDirectory(prefix="k2rl-bench-") as model_dir:
                config.save_pretrained(model_dir)
                train_tokenizer(BootstrapSpec()).save_pretrained(model_dir)
                spec = EngineSpec(model_dir, "float32", 256, 1, 0, True, load_format="dummy")
                # On the driver's node: the bench measures transfers through one node's shared memory.
                here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
                engine_actor = ray.remote(num_cpus=0, scheduling_strategy=here)(RolloutEngine)
                actors = [engine_actor.remote(spec) for _ in range(engines)]
                ray.get([actor.ready.remote() for actor in actors])
                packed = ray.get(actors[0].packed_modules.remote())
                node = ray.get(actors[0].node_id.remote())
            plan = plan_buckets(layout_of(state), packed, int(bucket_mb * 2**20), engines, f"k2rl-bench-{uuid.uuid4().hex[:8]}")
            writer = BucketWriter(plan, node, local_readers=tuple(range(engines)))
            update_ids = iter(range(1, 1 << 20))

            def update(readers: tuple[int, ...]) -> float:
                update_id = next(update_ids)
                request = WeightUpdate(plan, update_id, update_id, readers, timeout_s=300.0)
                start = time.perf_counter()
                loads = [actors[r].receive_update.remote(request, r) for r in readers]
                writer.write(request, ((name, state[name]) for name in plan.names))
                ray.get(loads)
                return time.perf_counter() - start

            update(tuple(range(engines)))  # attaches every engine to the block: not part of the timing
            # Interleaved, so that the machine's varying memory bandwidth affects every figure alike.
            memcpy = one = every = float("inf")
            for _ in range(repeats):
                memcpy = min(memcpy, memcpy_once())
                one = min(one, update((0,)))
                every = min(every, update(tuple(range(engines))) if engines > 1 else one)
        finally:
            for actor in actors:
                ray.get(actor.shutdown.remote())
                ray.kill(actor)
            if writer is not None:
                writer.close()

    def timing(seconds: float) -> Timing:
        return Timing(seconds, nbytes / seconds / 1e9, seconds / memcpy)

    return WeightSyncBench(
        params=total_params,
        gigabytes=nbytes / 1e9,
        buckets=len(plan.buckets),
        bucket_mb=bucket_mb,
        engines=engines,
        memcpy=timing(memcpy),
        one_engine=timing(one),
        all_engines=timing(every),
        all_engines_vs_one=every / one,
    )

