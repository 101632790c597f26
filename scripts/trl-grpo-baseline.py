"""TRL's GRPOTrainer on the embedded default policy, the reference run of docs/RECIPE.md's sweep.

The same prompts in the same order as `k2rl train` (its sampler, seed SEED), the same `math` reward
and budget rule (a response cut at 48 tokens earns 0), 16 prompts x 8 samples per step, and TRL's
own defaults otherwise (AdamW with a linear decay to 0, no KL). Greedy held-out accuracy on the
same 200 problems every 10 steps, written as JSON lines to OUT.

TRL is not a k2rl dependency:
    .venv/bin/pip install trl==1.16.0 accelerate
    .venv/bin/python scripts/trl-grpo-baseline.py STEPS LR SEED ADAM_BETA2 OUT    (e.g. 200 1e-4 0 0.999 trl.jsonl)
"""
import json
import os
import sys
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

from rewards.math_answer import math_reward
from rl.bootstrap import ensure_default_policy
from rl.data import PromptSampler, arithmetic_eval_tasks
from rl.evaluation import greedy_accuracy_hf

policy = str(ensure_default_policy())
steps, lr, seed, beta2, out = (
    int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
torch.set_num_threads(os.cpu_count() or 1)
eval_tasks = arithmetic_eval_tasks(200)
sampler = PromptSampler(None, seed, eval_tasks)
tasks = [t for _ in range(steps) for t in sampler.sample(16)]
by_question = {t.messages[-1]["content"]: t for t in tasks}
data = Dataset.from_list([{"prompt": list(t.messages), "question": t.messages[-1]["content"]} for t in tasks])


def reward(prompts, completions, question, completion_ids=None, **_):
    scores = []
    for q, c, ids in zip(question, completions, completion_ids):
        text = c[0]["content"] if isinstance(c, list) else c
        truncated = len(ids) >= 48 and ids[-1] != tok.eos_token_id
        scores.append(0.0 if truncated else math_reward(by_question[q], text).score)
    return scores


tok = AutoTokenizer.from_pretrained(policy)
model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
log = open(out, "w")
started = time.perf_counter()


class Eval(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step % 10 == 0 or state.global_step == steps:
            acc = greedy_accuracy_hf(kw["model"], tok, eval_tasks, 48, batch_size=200)
            log.write(json.dumps({"step": state.global_step, "eval_accuracy": acc, "seconds": time.perf_counter() - started}) + "\n")
            log.flush()


args = GRPOConfig(output_dir=os.path.join(os.path.dirname(os.path.abspath(out)), "trl-output"), use_cpu=True, learning_rate=lr, adam_beta2=beta2, per_device_train_batch_size=128,
                  gradient_accumulation_steps=1, num_generations=8, max_completion_length=48, temperature=1.0, beta=0.0,
                  max_steps=steps, logging_steps=10, save_strategy="no", report_to=[], seed=seed, shuffle_dataset=False,
                  bf16=False, dataloader_num_workers=0)
trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok, callbacks=[Eval()])
log.write(json.dumps({"step": 0, "eval_accuracy": greedy_accuracy_hf(model, tok, eval_tasks, 48, batch_size=200)}) + "\n")
trainer.train()
