"""PTX data (K2 §3.2.3): a curated dataset whose next-token loss is mixed into RL, against forgetting.

`trainer.ptx.path` is a JSONL file, one example per line:

    {"text": "..."}                                        loss on every token
    {"messages": [{"role": "user", "content": "..."},      loss on the assistant messages only
                  {"role": "assistant", "content": "..."}]}

A chat example is tokenised the way an episode is: the first messages rendered once with the chat
template, then each assistant message as its tokens and the end-of-turn token (loss mask 1), and
each other message as the template's delta (loss mask 0), so PTX trains on exactly the token
sequences the policy writes in RL. The last `trainer.ptx.eval_size` examples are held out: the
loss on them is `ptx_eval_loss`, measured at every evaluation.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from rl.config import ConfigError
from rl.records import TrainSample
from rollout.rendering import Renderer


def ptx_example(record: dict[str, Any], renderer: Renderer) -> TrainSample:
    """One example as a training sample: the loss mask covers the tokens to learn."""
    if isinstance(record.get("text"), str):
        ids = renderer.tokenizer(record["text"], add_special_tokens=True)["input_ids"]
        return _sample(ids[:1], ids[1:], [1] * (len(ids) - 1))
    messages = record.get("messages")
    if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in messages):
        raise ValueError('needs "text", or "messages" as a list of {"role", "content"}')
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
    if first is None or first == 0:
        raise ValueError("has no assistant message after the first message")
    prompt = renderer.prompt(messages[:first])
    tokens: list[int] = []
    mask: list[int] = []
    pending: list[dict[str, str]] = []
    for message in messages[first:]:
        if message["role"] == "assistant":
            if pending:
                bridge = renderer.bridge(pending)
                tokens += bridge
                mask += [0] * len(bridge)
                pending = []
            reply = renderer.tokenizer(message["content"], add_special_tokens=False)["input_ids"] + [renderer.eos_token_id]
            tokens += reply
            mask += [1] * len(reply)
        else:
            pending.append(message)
    return _sample(prompt, tokens, mask)


def _sample(prompt: list[int], tokens: list[int], mask: list[int]) -> TrainSample:
    n = len(tokens)
    return TrainSample(prompt + tokens, len(prompt), mask, [0.0] * n, [1.0] * n, [0] * n, 0.0)


class PTXData:
    """The PTX examples of a run: a training pool drawn from in shuffled passes, and a held-out set."""

    def __init__(self, path: str, renderer: Renderer, max_len: int, eval_size: int, seed: int):
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"trainer.ptx.path: {path} does not exist")
        examples = []
        for number, line in enumerate(file.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                sample = ptx_example(json.loads(line), renderer)
            except (json.JSONDecodeError, ValueError, TypeError) as error:
                raise ConfigError(f"trainer.ptx.path: {path}:{number}: {error}") from None
            if sample.prompt_len + len(sample.loss_mask) > max_len:
                raise ConfigError(f"trainer.ptx.path: {path}:{number}: {len(sample.token_ids)} tokens, more than "
                                  f"rollout.max_model_len={max_len}")
            if any(sample.loss_mask):
                examples.append(sample)
        if not examples:
            raise ConfigError(f"trainer.ptx.path: {path} has no tokens to train on (no text, no assistant message)")
        if eval_size >= len(examples):
            raise ConfigError(f"trainer.ptx.eval_size={eval_size} leaves no PTX example of the {len(examples)} in {path} to train on")
        self.train, self.heldout = examples[: len(examples) - eval_size], examples[len(examples) - eval_size :]
        self._rng = random.Random(seed)
        self._order: list[int] = []

    def sample(self, count: int) -> list[TrainSample]:
        drawn = []
        for _ in range(count):
            if not self._order:
                self._order = list(range(len(self.train)))
                self._rng.shuffle(self._order)
            drawn.append(self.train[self._order.pop()])
        return drawn

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self._rng.getstate()
        return {"rng": [version, list(internal), gauss], "order": list(self._order)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._order = list(state["order"])
