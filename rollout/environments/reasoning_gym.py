"""`reasoning-gym`: one question from any dataset of the `reasoning-gym` package, scored by the dataset.

    Task("r1", (), "math", reward="", env="reasoning-gym",
         env_kwargs={"dataset": "basic_arithmetic", "config": {"min_terms": 2, "max_terms": 3}})

`config` goes to `reasoning_gym.create_dataset(dataset, **config)`; its `seed` defaults to 0, so the
same reset seed gives the same question in every process (an episode may be replayed in another
environment worker). The reset seed picks the entry: `seed % size` (`size` is the dataset's,
500 unless the config says otherwise).

The prompt is the package's system prompt `system_prompt` (a key of `reasoning_gym.utils.SYSTEM_PROMPTS`,
"default" asks for the answer in <answer>...</answer> tags; "" for none) and the entry's question.
The one step takes the reply's last <answer>...</answer> block, as the package's own
`extract_answer` does (no block: no answer, score 0), scores it with the dataset's `score_answer`
(1.0 right; some datasets give partial credit in between) and ends the episode.

Synchronous on purpose: making a dataset can take seconds and some datasets' scoring runs
arbitrary work, so these environments run in environment workers, where neither holds up the
driver and a hang is cut off. Each worker keeps every dataset it made, by (name, config).
"""

from __future__ import annotations

import functools
import json
from typing import Any

import reasoning_gym
from reasoning_gym.dataset import ProceduralDataset
from reasoning_gym.utils import SYSTEM_PROMPTS, extract_answer

from rl.records import Task
from rollout.environments.base import Environment, Message, ResetResult, StepResult


class ReasoningGym(Environment):
    def __init__(self, dataset: str, config: dict[str, Any] | None = None, system_prompt: str = "default"):
        if system_prompt and system_prompt not in SYSTEM_PROMPTS:
            raise ValueError(f"system_prompt {system_prompt!r} is not one of reasoning-gym's: {sorted(SYSTEM_PROMPTS)}")
        self.name = dataset
        self.dataset = _dataset(dataset, json.dumps({"seed": 0, **(config or {})}, sort_keys=True))
        self.system_prompt = SYSTEM_PROMPTS[system_prompt] if system_prompt else ""
        self.entry: dict[str, Any] = {}

    def reset(self, task: Task, seed: int) -> ResetResult:
        index = seed % len(self.dataset)
        self.entry = self.dataset[index]
        prompt: list[Message] = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        prompt.append({"role": "user", "content": self.entry["question"]})
        # The reference answer is for logs and tests; the policy never sees info.
        return prompt, {"dataset": self.name, "index": index, "answer": self.entry["answer"]}

    def step(self, action: str) -> StepResult:
        answer = extract_answer(action)
        score = float(self.dataset.score_answer(answer, self.entry))
        return [], score, True, False, {"answer": answer}


@functools.cache
def _dataset(name: str, config_json: str) -> ProceduralDataset:
    """The dataset `name` made with the config (JSON text, so that it can be a cache key)."""
    config = json.loads(config_json)
    try:
        return reasoning_gym.create_dataset(name, **config)
    except (TypeError, ValueError, AssertionError) as error:  # unknown name, unknown or invalid config keys
        raise ValueError(f"reasoning-gym dataset {name!r} with config {config}: {error}") from None
