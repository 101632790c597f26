"""The trainer on the real shapes of three model families (Qwen2.5, Llama 3.2, Qwen3): tied embeddings
under data and tensor parallelism, bfloat16 compute over float32 master weights, QK-Clip with Qwen3's
q/k norms, and the whole loop with a vLLM engine for each family and layout."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from model_families import FAMILIES, build_family
from safetensors.torch import load_file
from processes import free_port
from trainer_helpers import full_parameters_and_grads, run_two_ranks, samples, start_worker
from transformers import AutoModelForCausalLM

from rl.cluster.trainer_group import merge_rank_metrics
from rl.config import TrainerConfig, load_config
from rl.loop import Controller
from rl.trainer.logprobs import token_logprobs
from rollout.rendering import Renderer


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """name -> the family's model directory, built on first use and kept for the session."""
    built: dict[str, Path] = {}

    def directory(name: str) -> Path:
        if name not in built:
            built[name] = build_family(FAMILIES[name], tmp_path_factory.mktemp(name))
        return built[name]

    return directory


@dataclass(frozen=True)
class Layout:
    data_parallel_size: int
    tensor_parallel_size: int

    @property
    def overrides(self) -> list[str]:
        return [f"trainer.data_parallel_size={self.data_parallel_size}", f"trainer.tensor_parallel_size={self.tensor_parallel_size}"]


DP2, TP2 = Layout(2, 1), Layout(1, 2)
# Below the largest attention logit of some heads in every family: each step also runs QK-Clip, over
# heads (Qwen2, Llama) or whole layers (Qwen3) that tensor parallelism splits over two ranks.
QK_CLIP_THRESHOLD = 0.06


def _probe(family: str, model_dir: Path) -> list[int]:
    """A chat prompt followed by tokens from both halves of the vocabulary: with tp=2, rows on either rank."""
    vocab = FAMILIES[family].config.vocab_size
    prompt = Renderer.from_pretrained(str(model_dir)).prompt([{"role": "user", "content": "Tom has 3 coins and finds 4 more."}])
    return prompt + [300, vocab // 2 - 1, vocab // 2, vocab - 10, 301]


# --- sharded trainer ranks, in-process ---------------------------------------------------------


def _one_step(rank: int, world_size: int, port: int, model_dir: Path, layout: Layout, dtype: str, out: Path) -> None:
    """One optimizer step on this rank's data shard; saves what the test checks of the sharded model."""
    config = TrainerConfig(
        data_parallel_size=layout.data_parallel_size,
        tensor_parallel_size=layout.tensor_parallel_size,
        micro_batch_size=2,
        qk_clip_threshold=QK_CLIP_THRESHOLD,
    )
    worker = start_worker(rank, world_size, port, str(model_dir), config, dtype)
    try:
        model = worker.model
        embedding = model.model.embed_tokens
        optimized = [param for optimizer in worker.optimizer.optimizers for group in optimizer.param_groups for param in group["params"]]
        batch = samples(8, model.config.vocab_size)
        shard = len(batch) // layout.data_parallel_size
        lo = rank // layout.tensor_parallel_size * shard
        metrics = worker.train(batch[lo : lo + shard], policy_version=0)
        states = [value for optimizer in worker.optimizer.optimizers for state in optimizer.state.values() for value in state.values()]
        result = {
            "tied": model.lm_head.weight is embedding.weight,
            "embedding_in_optimizer": sum(param is embedding.weight for param in optimized),
            "optimizer_entries": len(optimized),
            "parameters": len(list(model.parameters())),
            "parameter_dtypes": {param.dtype for param in model.parameters()},
            "gradient_dtypes": {param.grad.dtype for param in model.parameters()},
            "optimizer_state_dtypes": {value.dtype for value in states if isinstance(value, torch.Tensor) and value.is_floating_point()},
            "engine_layout": worker.weight_layout(),
            "metrics": metrics,
            "logprobs": worker.sequence_logprobs(batch[0].token_ids),
            "state": full_parameters_and_grads(model),
        }
        torch.save(result, out / f"rank{rank}.pt")
        if dtype != "float32":
            worker.save_model(str(out / "saved"))
    finally:
        worker.shutdown()


@pytest.fixture(scope="session")
def unsharded_step(tmp_path_factory):
    """model directory -> what `_one_step` saves on one float32 rank, computed once per model."""
    done: dict[Path, dict] = {}

    def result(model_dir: Path) -> dict:
        if model_dir not in done:
            out = tmp_path_factory.mktemp("unsharded")
            _one_step(0, 1, free_port(), model_dir, Layout(1, 1), "float32", out)
            done[model_dir] = torch.load(out / "rank0.pt")
        return done[model_dir]

    return result


@pytest.mark.parametrize("layout", [TP2], ids=["tp2"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_sharded_step_keeps_the_tie_and_equals_the_unsharded_step(family_dirs, unsharded_step, tmp_path, family, layout):
    model_dir = family_dirs(family)
    run_two_ranks(_one_step, model_dir, layout, "float32", tmp_path)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    whole = unsharded_step(model_dir)
    assert whole["metrics"]["max_attention_logit"] > QK_CLIP_THRESHOLD
    tied = FAMILIES[family].tied
    for rank in ranks:
        # A tied head is the embedding itself, on every rank and after the update: one parameter,
        # one optimizer entry, and sent to the engines once, as the embedding.
        assert rank["tied"] == tied
        assert rank["embedding_in_optimizer"] == 1
        assert rank["optimizer_entries"] == rank["parameters"] == whole["parameters"]
        names = [name for name, _, _ in rank["engine_layout"]]
        assert ("lm_head.weight" in names) != tied and "model.embed_tokens.weight" in names
        assert rank["metrics"]["max_attention_logit"] == pytest.approx(whole["metrics"]["max_attention_logit"], rel=1e-5)
        # After the update and the clip.
        torch.testing.assert_close(rank["logprobs"], whole["logprobs"], rtol=0, atol=1e-4)
        # Sharding changes the float32 summation order of the gradients, nothing more; with tp=2 this
        # covers the vocabulary-parallel head and (Qwen3) the q/k norms shared by heads on two ranks.
        for name, value in whole["state"].items():
            if name.endswith(".grad"):
                torch.testing.assert_close(rank["state"][name], value, rtol=0, atol=1e-6, msg=name)
    sharded = merge_rank_metrics([r["metrics"] for r in ranks], tensor_parallel_size=layout.tensor_parallel_size)
    assert sharded["loss"] == pytest.approx(merge_rank_metrics([whole["metrics"]], 1)["loss"], rel=1e-5)


def test_bfloat16_compute_keeps_float32_master_weights_with_tensor_parallelism(family_dirs, unsharded_step, tmp_path):
    """tp=2, dp=1: FSDP2 still casts for compute and reduces in float32, and the engines get bfloat16."""
    model_dir = family_dirs("llama3.2")
    run_two_ranks(_one_step, model_dir, TP2, "bfloat16", tmp_path)
    whole = unsharded_step(model_dir)
    for rank in (torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)):
        assert rank["tied"]
        assert rank["parameter_dtypes"] == rank["gradient_dtypes"] == rank["optimizer_state_dtypes"] == {torch.float32}
        assert {dtype for _, dtype, _ in rank["engine_layout"]} == {"bfloat16"}
        # bfloat16 has 8 significant bits: logprobs near log(1/128k) move by a few hundredths.
        torch.testing.assert_close(rank["logprobs"], whole["logprobs"], rtol=0, atol=0.1)
    # The saved model is in the engines' dtype, and says so.
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved.get("dtype", saved.get("torch_dtype")) == "bfloat16"
    assert {tensor.dtype for tensor in load_file(tmp_path / "saved" / "model.safetensors").values()} == {torch.bfloat16}


def test_qwen3_layers_are_clipped_as_a_whole(family_dirs, tmp_path):
    """q_norm/k_norm undo a per-head scale, so a layer with a head above the threshold is scaled by its
    smallest gamma: every head's logits shrink by that factor, the largest lands on the threshold."""
    model = AutoModelForCausalLM.from_pretrained(family_dirs("qwen3"))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_norm.weight.mul_(30.0)  # layer 0's logits grow 30-fold
    model.save_pretrained(tmp_path)
    batch = samples(8, model.config.vocab_size)
    config = TrainerConfig(data_parallel_size=1, lr=0.0, micro_batch_size=8, qk_clip_threshold=1e9)
    worker = start_worker(0, 1, free_port(), str(tmp_path), config)
    try:
        before = _recorded_max_logits(worker, batch)
        # Between layer 0's heads, above every head of layer 1: layer 0 alone is clipped, also the
        # heads of it that were below the threshold.
        threshold = before[0].median().item()
        assert before[0].min() < threshold < before[0].max() and before[1].max() < threshold
        worker.qk_clip.threshold = threshold
        weights_before = full_parameters_and_grads(worker.model)
        worker.train(batch, policy_version=0)
        after = _recorded_max_logits(worker, batch)
        gamma = threshold / before[0].max().item()
        torch.testing.assert_close(after[0], before[0] * gamma, rtol=1e-4, atol=0)
        assert after[0].max().item() == pytest.approx(threshold, rel=1e-4)
        # With lr=0 only the two norm weights of layer 0 moved, each by sqrt(gamma).
        for name, value in full_parameters_and_grads(worker.model).items():
            if name.endswith(".grad"):
                continue
            if name in ("model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"):
                torch.testing.assert_close(value, weights_before[name] * gamma**0.5, rtol=1e-6, atol=0)
            else:
                assert torch.equal(value, weights_before[name]), name
    finally:
        worker.shutdown()


def _recorded_max_logits(worker, batch) -> torch.Tensor:
    worker.qk_clip.reset()
    with torch.no_grad():
        worker._token_logprobs(worker._micro_batch(batch))
    return worker.qk_clip.max_logits()


# --- the whole loop: Ray, a vLLM engine, two trainer ranks ---------------------------------------

# About half the responses end within the 16-token budget (tests/model_families.py), and those cut off
# get a penalty below any reward: with 4 responses per prompt, some group differs in reward at every
# step, so every step has advantages and a gradient.
_SMALL_RUN = [
    "steps=2",
    "data.prompts_per_step=4",
    "rollout.n_samples=4",
    "data.eval_size=4",
    "trainer.micro_batch_size=4",
    "rollout.max_model_len=128",
    "rollout.default_token_budget=16",
    "rollout.token_budgets.arithmetic=16",
    "reward.budget_penalty=-1.0",
    # Random weights at temperature 1: some responses end before their budget and some are cut,
    # which the checks on truncated_frac need.
    "rollout.temperature=1.0",
    "rollout.num_engines=1",
    # The logprob-gap bounds below are float32's; auto would pick bfloat16 on a CPU with AMX.
    "model.dtype=float32",
]


def _run_loop(model_dir: Path, run_dir: Path, family: str, overrides: list[str]) -> tuple[list[tuple[int, int, float]], list[dict], list[float]]:
    """Two iterations; returns (step, weight version, largest engine-trainer gap on the probe) per step,
    the metrics rows, and the trainer's probe logprobs after the last update."""
    config = load_config(None, [*_SMALL_RUN, *overrides, f"model.path={model_dir}"])
    probe = _probe(family, model_dir)
    checks, trainer_logprobs = [], []

    def compare_logprobs(step, workers):
        engine = torch.tensor(workers.engines.sequence_logprobs(0, probe))
        trainer = torch.tensor(workers.trainers.logprobs(probe))
        checks.append((step, workers.weight_sync.version, (engine - trainer).abs().max().item()))
        trainer_logprobs[:] = trainer.tolist()

    summary = Controller(config, run_dir).run(str(model_dir), on_step=compare_logprobs)
    assert summary.weight_version == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert all(row["rollout_weight_version"] == row["weight_version"] - 1 for row in rows[1:]), rows
    return checks, rows, trainer_logprobs


@pytest.mark.integration
# Two data-parallel ranks with FSDP2 (not the replicas these small models would get by default), one
# on each node of the session's cluster. Tensor parallelism 2: the sharded steps above, and the whole
# loop in tests/test_sharded_loop.py.
@pytest.mark.parametrize("layout", [DP2], ids=["dp2-fsdp"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_loop_engines_and_trainer_agree(family_dirs, ray_cluster, tmp_path, family, layout):
    model_dir = family_dirs(family)
    overrides = [*layout.overrides, "trainer.data_parallel_strategy=fsdp"]
    checks, rows, trainer_logprobs = _run_loop(model_dir, tmp_path / "run", family, overrides)
    assert [(step, version) for step, version, _ in checks] == [(1, 1), (2, 2)]
    # Every update really changes the weights, so the agreement after it means something.
    assert all(0 < row["truncated_frac"] < 1 and row["grad_norm"] > 0 for row in rows[1:]), rows
    assert all(gap < 1e-3 for _, _, gap in checks), checks
    assert all(row["logprob_diff_mean"] < 1e-3 for row in rows[1:]), rows
    # The final directory is a Hugging Face model with the trained weights (a tied head saved once).
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert (final.lm_head.weight is final.model.embed_tokens.weight) == FAMILIES[family].tied
    ids = torch.tensor([_probe(family, model_dir)])
    with torch.no_grad():
        saved = token_logprobs(final(ids).logits, ids, 1.0)[0]
    torch.testing.assert_close(saved, torch.tensor(trainer_logprobs), rtol=0, atol=1e-4)
