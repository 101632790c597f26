"""Small, randomly initialised models with the real shapes of three Hugging Face model families.

Each family keeps what the trainer and the engines must get right for the real model: the
architecture class, the vocabulary size (so the output head is as wide as the real one), tied or
untied embeddings, grouped-query attention, Qwen3's q/k norms, and a tokenizer of exactly that
vocabulary with a chat template whose end-of-turn token is the end-of-sequence token. Depth and
width are shrunk to fit a CPU: two layers, hidden size 128, heads of 64 (vLLM's CPU attention
needs head_dim >= 32), head counts that a tensor-parallel size of 2 divides.

The tokenizer is a byte-level BPE trained on the arithmetic generator's text, its vocabulary
padded with filler tokens up to the family's size; the special tokens take the last ids, as in
the real tokenizers.

A randomly initialised model finds every token about as likely as any other, so its responses
would never end before their token budget: every response of a group would then get the same
reward (the budget penalty), no advantage, no gradient, and training would change nothing. The
models are therefore given one deliberate trait: the end-of-turn token has a fixed, moderate
probability at every position (`_END_OF_TURN_PROBABILITY`), so that about half the responses end
within a budget of 16 tokens and half are cut off.
"""

from __future__ import annotations

import copy
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config

from rl.data.arithmetic import arithmetic_problem

_CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_LLAMA3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_LLAMA3_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
# Merges learnt from the arithmetic text keep prompts short; the rest of the vocabulary is filler.
_LEARNT_VOCABULARY = 1024
_SHRUNK = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, max_position_embeddings=512)
_END_OF_TURN_PROBABILITY = 0.042
# A constant this large in one embedding column dominates the residual stream of a random model.
_CONSTANT_FEATURE = 1.0


@dataclass(frozen=True)
class ModelFamily:
    name: str
    config: PretrainedConfig
    special_tokens: tuple[str, ...]
    eos_token: str
    bos_token: str
    pad_token: str
    chat_template: str

    @property
    def tied(self) -> bool:
        return self.config.tie_word_embeddings


def _qwen25() -> ModelFamily:
    # Qwen2 in vLLM derives head_dim from hidden_size / heads: 2 heads of 64.
    config = Qwen2Config(vocab_size=151_936, num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True, **_SHRUNK)
    return ModelFamily("qwen2.5", config, _QWEN_SPECIAL_TOKENS, "<|im_end|>", "<|endoftext|>", "<|endoftext|>", _CHATML_TEMPLATE)


def _llama32() -> ModelFamily:
    config = LlamaConfig(
        vocab_size=128_256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
        rope_theta=500_000.0, **_SHRUNK,
    )  # fmt: skip
    return ModelFamily("llama3.2", config, _LLAMA3_SPECIAL_TOKENS, "<|eot_id|>", "<|begin_of_text|>", "<|end_of_text|>", _LLAMA3_TEMPLATE)


def _qwen3() -> ModelFamily:
    # Untied, as the larger Qwen3 models are: the head is a parameter of its own.
    config = Qwen3Config(vocab_size=151_936, num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=False, **_SHRUNK)
    return ModelFamily("qwen3", config, _QWEN_SPECIAL_TOKENS, "<|im_end|>", "<|endoftext|>", "<|endoftext|>", _CHATML_TEMPLATE)


FAMILIES = {family.name: family for family in (_qwen25(), _llama32(), _qwen3())}


def build_tokenizer(family: ModelFamily) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of exactly `family.config.vocab_size` tokens."""
    rng = random.Random(0)
    corpus = [arithmetic_problem(rng).question for _ in range(2000)]
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    learner.train_from_iterator(
        corpus,
        trainers.BpeTrainer(vocab_size=_LEARNT_VOCABULARY, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False),
    )
    learnt = json.loads(learner.to_str())["model"]
    vocabulary, merges = learnt["vocab"], [tuple(merge) for merge in learnt["merges"]]
    regular_size = family.config.vocab_size - len(family.special_tokens)
    vocabulary.update({f"<filler_{index}>": index for index in range(len(vocabulary), regular_size)})
    tokenizer = Tokenizer(models.BPE(vocab=vocabulary, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(family.special_tokens))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=family.eos_token,
        bos_token=family.bos_token,
        pad_token=family.pad_token,
        chat_template=family.chat_template,
        model_max_length=family.config.max_position_embeddings,
    )
    assert len(fast) == family.config.vocab_size, (family.name, len(fast))
    return fast


def build_family(family: ModelFamily, directory: Path, seed: int = 0) -> Path:
    """Save the family's randomly initialised model and its tokenizer as a Hugging Face model directory."""
    tokenizer = build_tokenizer(family)
    config = copy.deepcopy(family.config)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _make_end_of_turn_likely(model, tokenizer)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@torch.no_grad()
def _make_end_of_turn_likely(model, tokenizer: PreTrainedTokenizerFast) -> None:
    """Give the end-of-turn token about _END_OF_TURN_PROBABILITY at every position.

    Embedding column 0 becomes a constant, so that after the final norm every position carries a
    component n_0 of about the same size along it. The end-of-turn row of the head then reads
    that component: its logit exceeds the others' (nearly equal) logits by the log-odds that
    give it the wanted probability. n_0 is measured on a rendered prompt rather than derived.
    """
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    embedding[:, 0] = _CONSTANT_FEATURE
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Ana has 5 pens."}], add_generation_prompt=True, tokenize=False)
    fillers_as_response = list(range(1000, 1016))
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"] + fillers_as_response
    n_0 = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, :, 0].mean().item()
    p = _END_OF_TURN_PROBABILITY
    log_odds = math.log(p / (1 - p) * (len(tokenizer) - 1))
    head[tokenizer.eos_token_id, 0] = head[:, 0].mean() + log_odds / n_0
