"""Held-out accuracy: the fraction of tasks whose greedy response earns a full reward."""

from __future__ import annotations

import torch

from rewards import RewardScorer
from rl.records import RewardResult, Task


def accuracy(results: list[RewardResult | None]) -> float:
    """The share of full rewards; an episode with no reward (it failed) counts as wrong."""
    return sum(result is not None and not result.failed and result.score >= 1.0 for result in results) / len(results)


@torch.no_grad()
def greedy_accuracy_hf(model, tokenizer, tasks: list[Task], max_new_tokens: int, batch_size: int = 100) -> float:
    """Greedy accuracy with Hugging Face `generate`, used before any vLLM engine exists (bootstrap SFT)."""
    model.eval()
    tokenizer.padding_side = "left"
    responses = []
    for start in range(0, len(tasks), batch_size):
        chunk = tasks[start : start + batch_size]
        prompts = [tokenizer.apply_chat_template(list(t.messages), add_generation_prompt=True, tokenize=False) for t in chunk]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        responses += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    model.train()
    with RewardScorer(num_workers=0) as scorer:
        return accuracy(scorer.score([(task, text, False) for task, text in zip(tasks, responses)], budget_penalty=0.0))
