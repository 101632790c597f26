"""Messages into token ids, on the rollout layer's side of the engines (which only see tokens).

An episode is rendered once, at its start (`prompt`). After that, the policy's own tokens are kept
exactly as the engine produced them, and each environment turn is appended as the chat template's
*delta* (`bridge`): the tokens that close the assistant's turn and render the new messages up to
the next generation prompt. Earlier turns are never re-tokenised, so the trainer sees exactly the
tokens that were sampled.

Models without a chat template use the plain format instead (`model.prompt_format: plain`, or
`auto` when the tokenizer has no template):

    System: {content}
    User: {content}
    Assistant: {content}<eos>
    Tool: {content}
    Assistant:

one line per message, the role capitalised, and the prompt ending in "Assistant:" with the
policy writing from there to its end-of-sequence token.
"""

from __future__ import annotations

import functools
import json

from transformers import AutoTokenizer, PreTrainedTokenizerBase

# A stand-in conversation: the delta of a new turn is what rendering it after this adds.
_STAND_IN = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]


class RenderError(ValueError):
    """The chat template cannot render a turn the way the rollout layer needs; names the template's problem."""


class Renderer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_format: str = "auto"):
        self.tokenizer = tokenizer
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if prompt_format == "chat" and not has_template:
            raise RenderError("model.prompt_format=chat, but the model's tokenizer has no chat template")
        self.chat = prompt_format == "chat" or (prompt_format == "auto" and has_template)
        if tokenizer.eos_token_id is None:
            raise RenderError("the model's tokenizer has no end-of-sequence token, so a turn could never end")
        self.eos_token_id = tokenizer.eos_token_id
        # The K episodes of a group, and every evaluation, start from the same conversations.
        self._prompt_ids = functools.lru_cache(maxsize=8192)(self._render_prompt)

    @classmethod
    def from_pretrained(cls, model_path: str, prompt_format: str = "auto") -> Renderer:
        return cls(AutoTokenizer.from_pretrained(model_path), prompt_format)

    def prompt(self, messages: list[dict[str, str]] | tuple[dict[str, str], ...]) -> list[int]:
        """The token ids of a conversation up to the policy's first generation."""
        return list(self._prompt_ids(json.dumps(list(messages), sort_keys=True)))

    def _render_prompt(self, conversation: str) -> tuple[int, ...]:
        ids = self._encode(self._text(json.loads(conversation), add_generation_prompt=True))
        # A chat template writes its own beginning-of-sequence token; the plain format needs the tokenizer's.
        return tuple(ids if self.chat else self._bos + ids)

    def bridge(self, messages: list[dict[str, str]]) -> list[int]:
        """Tokens to append after the policy's end-of-turn token so that `messages` follow and the
        policy's next turn begins."""
        if not self.chat:
            return self._encode("\n" + self._plain(messages) + "Assistant:")
        before = self._text(_STAND_IN, add_generation_prompt=False)
        after = self._text(_STAND_IN + list(messages), add_generation_prompt=True)
        if not after.startswith(before):
            raise RenderError("the chat template renders earlier turns differently once a new turn follows")
        return self._encode(self._after_end_of_turn(before) + after[len(before):])

    def decode(self, token_ids: list[int]) -> str:
        """The text of generated tokens, without special tokens (the end-of-turn token)."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _after_end_of_turn(self, rendered: str) -> str:
        """What the template writes after an assistant turn's end token (Qwen: a newline)."""
        eos = self.tokenizer.eos_token
        return rendered[rendered.rindex(eos) + len(eos):] if eos and eos in rendered else ""

    def _text(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if not self.chat:
            text = self._plain(messages)
            return text + "Assistant:" if add_generation_prompt else text
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    def _plain(self, messages: list[dict[str, str]]) -> str:
        return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)

    @functools.cached_property
    def _bos(self) -> list[int]:
        """A beginning-of-sequence token the tokenizer would add to a whole prompt, if any (Llama)."""
        ids = self.tokenizer("", add_special_tokens=True)["input_ids"]
        return ids[:1] if ids and ids[0] == self.tokenizer.bos_token_id else []

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]
