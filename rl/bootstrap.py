"""The embedded default policy: a locally trained tokenizer and a small Qwen2 model, warm-started by SFT.

No model hub is needed. `k2rl bootstrap` (or the first `k2rl train` without
`model.path`) trains a byte-level BPE tokenizer on arithmetic word problems, builds
a small Qwen2-architecture causal LM, and runs a short SFT on solutions in
two styles (direct answers and worked column arithmetic). The policy is left
weak, and mostly answers directly, so that RL has something to improve.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from rl.data.arithmetic import arithmetic_eval_tasks, arithmetic_problem, arithmetic_train_problems
from rl.evaluation import greedy_accuracy_hf

POLICY_NAME = "arith-qwen2-v1"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@dataclass(frozen=True)
class BootstrapSpec:
    seed: int = 0
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 4
    # vLLM's CPU attention needs head_dim >= 32; 64 is its best-tested size.
    num_heads: int = 2
    head_dim: int = 64
    max_positions: int = 256
    sft_batch_size: int = 64
    sft_lr: float = 2e-3
    sft_steps: int = 1000
    eval_size: int = 200
    worked_fraction: float = 0.4


def default_policy_dir() -> Path:
    cache = Path(os.environ.get("K2RL_CACHE", Path.home() / ".cache" / "k2rl"))
    return cache / "policies" / POLICY_NAME


def ensure_default_policy() -> Path:
    """Return the cached default policy, building it on first use."""
    path = default_policy_dir()
    if not (path / "bootstrap.json").exists():
        print(f"k2rl: building the default policy into {path} (one time, a few minutes)", file=sys.stderr)
        report = bootstrap(path, BootstrapSpec())
        print(f"k2rl: default policy built in {report.seconds:.0f} s: {report.describe()}", file=sys.stderr)
    return path


def train_tokenizer(spec: BootstrapSpec) -> PreTrainedTokenizerFast:
    rng = random.Random(spec.seed)
    corpus = []
    for _ in range(4000):
        problem = arithmetic_problem(rng)
        corpus += [problem.question, problem.direct_solution(), problem.worked_solution()]
    tokenizer = Tokenizer(models.BPE())
    # One token per digit, as in Qwen and Llama: numbers stay compositional.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=spec.max_positions,
    )


def build_model(spec: BootstrapSpec, tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    torch.manual_seed(spec.seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    return Qwen2ForCausalLM(config)


def _sft_batch(problems, tokenizer, rng: random.Random, worked_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels that are -100 everywhere but the response.

    The responses mix two styles, as real SFT data does: mostly direct answers, some
    worked column arithmetic. The worked style is far more often right; finding
    that out is left to RL.
    """
    rows, labels = [], []
    for problem in problems:
        solution = problem.worked_solution() if rng.random() < worked_fraction else problem.direct_solution()
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": problem.question}], add_generation_prompt=True, tokenize=False
        )
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt_ids + response_ids)
        labels.append([-100] * len(prompt_ids) + response_ids)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    label_ids = torch.tensor([row + [-100] * (width - len(row)) for row in labels])
    return input_ids, label_ids


@dataclass
class BootstrapReport:
    sft_steps: int
    eval_accuracy: float
    seconds: float
    parameters: int

    def describe(self) -> str:
        return f"{self.parameters:,} parameters, {self.sft_steps} SFT steps, held-out accuracy {self.eval_accuracy:.3f}"


def bootstrap(out_dir: Path, spec: BootstrapSpec) -> BootstrapReport:
    """Build tokenizer and model, run the SFT, save as a Hugging Face model directory."""
    start = time.perf_counter()
    torch.manual_seed(spec.seed)
    tokenizer = train_tokenizer(spec)
    model = build_model(spec, tokenizer)
    eval_tasks = arithmetic_eval_tasks(spec.eval_size)
    exclude = {task.messages[-1]["content"] for task in eval_tasks}
    problems = arithmetic_train_problems(spec.seed + 1, exclude)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.sft_lr, weight_decay=0.0)
    style_rng = random.Random(spec.seed + 2)
    for _ in tqdm(range(spec.sft_steps), desc="bootstrap SFT", unit="step"):
        batch = [next(problems) for _ in range(spec.sft_batch_size)]
        input_ids, labels = _sft_batch(batch, tokenizer, style_rng, spec.worked_fraction)
        loss = model(input_ids=input_ids, attention_mask=input_ids.ne(tokenizer.pad_token_id), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    report = BootstrapReport(
        sft_steps=spec.sft_steps,
        eval_accuracy=greedy_accuracy_hf(model, tokenizer, eval_tasks, max_new_tokens=48),
        seconds=round(time.perf_counter() - start, 1),
        parameters=sum(p.numel() for p in model.parameters()),
    )
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "bootstrap.json").write_text(json.dumps({"spec": asdict(spec), "report": asdict(report)}, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return report
