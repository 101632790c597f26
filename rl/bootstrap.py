"""The embedded default policy: a locally trained tokenizer and a small Qwen2 model, warm-started by SFT.

No model hub is needed. `k2rl bootstrap` (or the first `k2rl train` without
`model.path`) trains a byte-level BPE tokenizer on arithmetic word problems, builds
a small Qwen2-architecture causal LM, and runs a short SFT on solutions in
two styles (direct answers and worked column arithmetic). The policy is left
weak, and mostly answers directly, so that RL has something to improve.

Two more embedded policies (`model.embedded`), each cached under a name of its own so that the
default policy stays exactly as it is:
- `self-critique`: a longer context and comparison examples mixed into the SFT: a question, two
  solutions in the comparison prompt of rewards/rubric.py (a right and a wrong one, two right or
  two wrong ones), and a reply that works the problem out, checks each response's answer against
  its own digit by digit (`check_line`), and ends with the verdict. Its critic then starts above
  chance. Its model is deeper and has more, narrower heads than the default's (6 layers of 4
  heads of 32, against 4 layers of 2 heads of 64): with the default's shape the critic copied its
  own answer into the check of the response furthest back instead of that response's.
- `tool-use`: 3-digit multiplications (which a model this small cannot do in its head) mixed into
  the SFT, half of them solved as a `python-tool` episode: a fenced python block that prints
  the product, the tool's reply, then the boxed answer; the rest answered directly (and so, at
  test time, mostly wrongly). The policy starts calling the tool now and then; RL finds out that
  it pays.
"""

from __future__ import annotations

import fcntl
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

from rewards.rubric import Verdict, comparison_messages, load_rubric
from rl.data.arithmetic import TOOL_KIND, ArithmeticProblem, arithmetic_eval_tasks, arithmetic_problem, arithmetic_train_problems
from rl.evaluation import greedy_accuracy_hf
from rl.records import Task
from rollout.environments.python_tool import INSTRUCTIONS as TOOL_INSTRUCTIONS
from rollout.rendering import Renderer

POLICY_NAME = "arith-qwen2-v1"
# The rubric of the comparison examples: the one critic tasks use by default (reward.critic.rubric).
COMPARISON_RUBRIC = "compact"
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
    # The SFT learning rate falls linearly from sft_lr to this; None keeps it constant.
    sft_lr_end: float | None = None
    sft_steps: int = 1000
    eval_size: int = 200
    worked_fraction: float = 0.4
    # This share of the SFT batches are comparisons of two solutions, answered with the verdict (the
    # critic's warm start); 0 builds exactly the default policy.
    comparison_fraction: float = 0.0
    # Of the comparisons, this share pairs two right solutions, and this share two wrong ones (both
    # verdict TIE): with both kinds, one response's check cannot be guessed from the other's.
    tie_fraction: float = 0.2
    both_wrong_fraction: float = 0.0
    # This share of the SFT batches are 3-digit multiplications in the python-tool environment's
    # prompt; of those, `tool_call_fraction` are solved with a tool call, the rest directly. 0
    # builds exactly the default policy.
    tool_fraction: float = 0.0
    tool_call_fraction: float = 0.25


# The embedded policies that model.embedded names: cache name and spec. The self-critique policy has
# room for a comparison prompt with two responses, more steps, so that it sees as many word problems
# as the default policy does (so has the tool-use policy), and the heads to copy an answer from
# anywhere in that prompt (docs/RECIPE.md, "A critic of six layers").
EMBEDDED_POLICIES = {
    "default": (POLICY_NAME, BootstrapSpec()),
    "self-critique": (
        "arith-qwen2-critic-v5",
        BootstrapSpec(max_positions=512, num_layers=6, num_heads=4, head_dim=32, comparison_fraction=0.5, both_wrong_fraction=0.15,
                      sft_steps=2000, sft_lr_end=2e-4),
    ),
    # Tool calls in 15% of its SFT batches (0.3 x 0.5): with 5% (v1) it never learnt to copy the
    # question's numbers into the call, nor the tool's reply into the answer, and RL had no reward.
    "tool-use": ("arith-qwen2-tools-v2", BootstrapSpec(tool_fraction=0.3, tool_call_fraction=0.5, sft_steps=1250)),
}
# A critic's reply to a comparison: it works the problem out (the worked style), checks both
# responses' answers against its own, then gives the verdict.
COMPARISON_REPLY_TOKENS = 96
# Answers are written left-aligned in this many characters, filled with "_", so that the n-th digits
# of two answers always lie the same number of tokens apart (the tokenizer keeps "_" and digits single).
CHECK_WIDTH = 3


def default_policy_dir(name: str = POLICY_NAME) -> Path:
    cache = Path(os.environ.get("K2RL_CACHE", Path.home() / ".cache" / "k2rl"))
    return cache / "policies" / name


def ensure_default_policy(embedded: str = "default") -> Path:
    """Return the cached embedded policy `embedded` (EMBEDDED_POLICIES), building it on first use."""
    name, spec = EMBEDDED_POLICIES[embedded]
    path = default_policy_dir(name)
    if (path / "bootstrap.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Two runs started together on a fresh machine: one builds, the other waits for it.
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "bootstrap.json").exists():
            print(f"k2rl: building the embedded policy {name} into {path} (one time: minutes to most of an hour on 2 CPU cores)", file=sys.stderr)
            report = bootstrap(path, spec)
            print(f"k2rl: {name} built in {report.seconds:.0f} s: {report.describe()}", file=sys.stderr)
    return path


def _wrong_solution(problem: ArithmeticProblem, rng: random.Random, worked: bool) -> tuple[str, int]:
    """A wrong solution to the problem and its final answer: a misread operand (the working is
    consistent but answers another question) or a slip at the end (the working is right, the final
    answer is off)."""
    b = problem.b + rng.choice((-2, -1, 1, 2))
    if rng.random() < 0.5 and 0 < b != problem.b and not (problem.op == "-" and b > problem.a):
        misread = ArithmeticProblem(problem.question, problem.a, problem.op, b, {"+": problem.a + b, "-": problem.a - b, "*": problem.a * b}[problem.op])
        return (misread.worked_solution() if worked else misread.direct_solution()), misread.answer
    right = problem.worked_solution() if worked else problem.direct_solution()
    slip = problem.answer + rng.choice([delta for delta in (-10, -1, 1, 10) if problem.answer + delta >= 0])
    return right.replace(f"\\boxed{{{problem.answer}}}", f"\\boxed{{{slip}}}"), slip


def check_line(letter: str, answer: int, own_answer: int) -> str:
    """One line of a critic's check: the response's answer and the critic's own, left-aligned in
    CHECK_WIDTH characters, a mark per character ("=" same, "x" different), and the label.

        A: 22_ 26_ = x = wrong

    Every mark compares the two characters that lie a fixed number of tokens before it, and the
    label reads the three marks just before it: each step is local, which a model of a million
    parameters learns where it does not learn to compare two numbers written anywhere."""
    theirs, ours = (str(value).ljust(CHECK_WIDTH, "_") for value in (answer, own_answer))
    marks = " ".join("=" if a == b else "x" for a, b in zip(theirs, ours))
    return f"{letter}: {theirs} {ours} {marks} {'right' if theirs == ours else 'wrong'}"


def comparison_example(problem: ArithmeticProblem, rng: random.Random, spec: BootstrapSpec, rubric: str) -> tuple[list[dict[str, str]], str]:
    """A comparison prompt with two solutions of `problem`, each direct or worked: a right and a
    wrong one in a random order, two right ones (`spec.tie_fraction`) or two wrong ones
    (`spec.both_wrong_fraction`). The reply works the problem out, checks each response's answer
    against its own (`check_line`) and ends with the verdict line: a critic this small cannot tell
    a right number from a wrong one at a glance, but it can compute the answer and compare."""
    def right() -> tuple[str, int]:
        return (problem.worked_solution() if rng.random() < spec.worked_fraction else problem.direct_solution()), problem.answer

    def wrong() -> tuple[str, int]:
        return _wrong_solution(problem, rng, worked=rng.random() < spec.worked_fraction)

    draw = rng.random()
    if draw < spec.tie_fraction:
        first, second = right(), right()
    elif draw < spec.tie_fraction + spec.both_wrong_fraction:
        first, second = wrong(), wrong()
    else:
        first, second = (right(), wrong()) if rng.random() < 0.5 else (wrong(), right())
    first_right, second_right = first[1] == problem.answer, second[1] == problem.answer
    verdict = Verdict.A if first_right > second_right else Verdict.B if second_right > first_right else Verdict.TIE
    reply = "\n".join(
        [problem.worked_solution(), check_line("A", first[1], problem.answer), check_line("B", second[1], problem.answer), f"VERDICT: {verdict.value}"]
    )
    return comparison_messages(problem.question, first[0], second[0], rubric), reply


def comparison_eval_problems(spec: BootstrapSpec) -> list[ArithmeticProblem]:
    """The questions of the warm-started critic's held-out comparisons (kept out of its SFT)."""
    rng = random.Random(spec.seed + 4)
    return [arithmetic_problem(rng) for _ in range(spec.eval_size)]


def comparison_eval_tasks(spec: BootstrapSpec) -> list[Task]:
    """Held-out comparisons, scored by `critic_verdict`: how often the critic gives the right verdict."""
    rng = random.Random(spec.seed + 5)
    rubric = load_rubric(COMPARISON_RUBRIC)
    tasks = []
    for index, problem in enumerate(comparison_eval_problems(spec)):
        messages, reply = comparison_example(problem, rng, spec, rubric)
        gold = reply.rsplit("VERDICT: ", 1)[1]
        tasks.append(Task(f"compare-{index}", tuple(messages), "critique", "critic_verdict", {"gold": gold}))
    return tasks


def train_tokenizer(spec: BootstrapSpec) -> PreTrainedTokenizerFast:
    rng = random.Random(spec.seed)
    corpus = []
    for _ in range(4000):
        problem = arithmetic_problem(rng)
        corpus += [problem.question, problem.direct_solution(), problem.worked_solution()]
    if spec.comparison_fraction:
        # The comparison prompt's words get tokens of their own, so that two responses fit the context.
        comparison_rng = random.Random(spec.seed + 6)
        rubric = load_rubric(COMPARISON_RUBRIC)
        for _ in range(1000):
            messages, reply = comparison_example(arithmetic_problem(comparison_rng), comparison_rng, spec, rubric)
            corpus += [messages[0]["content"], reply]
    if spec.tool_fraction:
        tool_rng = random.Random(spec.seed + 7)
        for _ in range(1000):
            problem = arithmetic_problem(tool_rng, kinds=(TOOL_KIND,))
            corpus += [TOOL_INSTRUCTIONS, problem.question, f"```python\nprint({problem.a} * {problem.b})\n```"]
    tokenizer = Tokenizer(models.BPE())
    # One token per digit, as in Qwen and Llama: numbers stay compositional. A critic's check fills
    # answers with "_", one token each (check_line).
    splits = [pre_tokenizers.Digits(individual_digits=True)]
    if spec.comparison_fraction:
        splits.append(pre_tokenizers.Split("_", behavior="isolated"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(splits + [pre_tokenizers.ByteLevel(add_prefix_space=False)])
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


def tool_episode(problem: ArithmeticProblem, renderer: Renderer, rng: random.Random, spec: BootstrapSpec) -> tuple[list[int], list[int]]:
    """A 3-digit multiplication in the python-tool environment's prompt, as token ids and labels:
    with probability `spec.tool_call_fraction` a tool call that prints the product, the tool's reply
    (exactly as the environment renders it), then the boxed answer; otherwise the direct answer.
    Tokens are joined the way an episode joins them (rollout/rendering.py), so the SFT sees what
    the policy will see."""
    prompt = renderer.prompt([{"role": "system", "content": TOOL_INSTRUCTIONS}, {"role": "user", "content": problem.question}])
    answer = renderer.tokenizer(problem.direct_solution(), add_special_tokens=False)["input_ids"] + [renderer.eos_token_id]
    if rng.random() >= spec.tool_call_fraction:
        return prompt + answer, [-100] * len(prompt) + answer
    call_text = f"```python\nprint({problem.a} * {problem.b})\n```"
    call = renderer.tokenizer(call_text, add_special_tokens=False)["input_ids"] + [renderer.eos_token_id]
    reply = renderer.bridge([{"role": "tool", "content": f"{problem.answer}\n"}])
    return prompt + call + reply + answer, [-100] * len(prompt) + call + [-100] * len(reply) + answer


def _tool_batch(problems, tokenizer, rng: random.Random, spec: BootstrapSpec) -> tuple[torch.Tensor, torch.Tensor]:
    renderer = Renderer(tokenizer, "chat")
    return _padded([tool_episode(problem, renderer, rng, spec) for problem in problems], tokenizer.pad_token_id)


def _padded(rows: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels (-100 on the padding)."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    label_ids = torch.tensor([labels + [-100] * (width - len(labels)) for _, labels in rows])
    return input_ids, label_ids


def _sft_batch(problems, tokenizer, rng: random.Random, spec: BootstrapSpec, comparisons: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels that are -100 everywhere but the response.

    The responses mix two styles, as real SFT data does: mostly direct answers, some
    worked column arithmetic. The worked style is far more often right; finding
    that out is left to RL. A batch of `comparisons` (the self-critique policy) holds
    comparisons of two solutions instead, each answered with its verdict; such a
    batch is all comparisons because they are longer, and padding short rows to
    them would cost more than the comparisons themselves.
    """
    rubric = load_rubric(COMPARISON_RUBRIC) if comparisons else ""
    rows = []
    for problem in problems:
        if comparisons:
            messages, solution = comparison_example(problem, rng, spec, rubric)
        else:
            messages = [{"role": "user", "content": problem.question}]
            solution = problem.worked_solution() if rng.random() < spec.worked_fraction else problem.direct_solution()
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((prompt_ids + response_ids, [-100] * len(prompt_ids) + response_ids))
    return _padded(rows, tokenizer.pad_token_id)


@dataclass
class BootstrapReport:
    sft_steps: int
    eval_accuracy: float
    seconds: float
    parameters: int
    # The self-critique policy: its share of right verdicts on held-out comparisons (chance is about 1/3).
    comparison_accuracy: float | None = None

    def describe(self) -> str:
        comparisons = "" if self.comparison_accuracy is None else f", held-out verdict accuracy {self.comparison_accuracy:.3f}"
        return f"{self.parameters:,} parameters, {self.sft_steps} SFT steps, held-out accuracy {self.eval_accuracy:.3f}{comparisons}"


def bootstrap(out_dir: Path, spec: BootstrapSpec) -> BootstrapReport:
    """Build tokenizer and model, run the SFT, save as a Hugging Face model directory (replacing
    an earlier build there, never a folder that holds anything else)."""
    out_dir = Path(out_dir).resolve()
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "bootstrap.json").exists():
        raise ValueError(f"{out_dir} holds files but no bootstrap.json (not a built policy): choose an empty or new folder")
    # The policy is saved beside out_dir and moved there: its folder must exist before minutes of SFT.
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"{out_dir}: cannot create its folder ({error.strerror}: {error.filename})") from None
    start = time.perf_counter()
    torch.manual_seed(spec.seed)
    tokenizer = train_tokenizer(spec)
    model = build_model(spec, tokenizer)
    eval_tasks = arithmetic_eval_tasks(spec.eval_size)
    exclude = {task.messages[-1]["content"] for task in eval_tasks}
    if spec.comparison_fraction:
        exclude |= {problem.question for problem in comparison_eval_problems(spec)}
    problems = arithmetic_train_problems(spec.seed + 1, exclude)
    # The tool-use policy's 3-digit problems never include a held-out one of that kind.
    tool_exclude = {task.messages[-1]["content"] for task in arithmetic_eval_tasks(spec.eval_size, (TOOL_KIND,))}
    tool_problems = arithmetic_train_problems(spec.seed + 8, tool_exclude, kinds=(TOOL_KIND,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.sft_lr, weight_decay=0.0)
    style_rng = random.Random(spec.seed + 2)
    comparison_rng = random.Random(spec.seed + 3)
    tool_rng = random.Random(spec.seed + 9)
    end_factor = 1.0 if spec.sft_lr_end is None else spec.sft_lr_end / spec.sft_lr
    schedule = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=end_factor, total_iters=spec.sft_steps)
    for _ in tqdm(range(spec.sft_steps), desc="bootstrap SFT", unit="step"):
        # Each draw only when its feature is on, so that the default policy's random streams stay as they were.
        if spec.tool_fraction and tool_rng.random() < spec.tool_fraction:
            input_ids, labels = _tool_batch([next(tool_problems) for _ in range(spec.sft_batch_size)], tokenizer, tool_rng, spec)
        elif spec.comparison_fraction and comparison_rng.random() < spec.comparison_fraction:
            input_ids, labels = _sft_batch([next(problems) for _ in range(spec.sft_batch_size)], tokenizer, comparison_rng, spec, comparisons=True)
        else:
            input_ids, labels = _sft_batch([next(problems) for _ in range(spec.sft_batch_size)], tokenizer, style_rng, spec)
        loss = model(input_ids=input_ids, attention_mask=input_ids.ne(tokenizer.pad_token_id), labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    report = BootstrapReport(
        sft_steps=spec.sft_steps,
        eval_accuracy=greedy_accuracy_hf(model, tokenizer, eval_tasks, max_new_tokens=48),
        seconds=round(time.perf_counter() - start, 1),
        parameters=sum(p.numel() for p in model.parameters()),
        comparison_accuracy=greedy_accuracy_hf(model, tokenizer, comparison_eval_tasks(spec), max_new_tokens=COMPARISON_REPLY_TOKENS)
        if spec.comparison_fraction else None,
    )
    staging = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "bootstrap.json").write_text(json.dumps({"spec": asdict(spec), "report": asdict(report)}, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return report
