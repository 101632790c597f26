"""Rendering conversations into the token ids the engines see."""

from conftest import TINY_SPEC
from rl.bootstrap import train_tokenizer
from rollout.rendering import Renderer


def test_a_prompt_is_the_chat_templates_rendering_and_each_call_gets_its_own_list():
    tokenizer = train_tokenizer(TINY_SPEC)
    renderer = Renderer(tokenizer, "chat")
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    expected = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                         add_special_tokens=False)["input_ids"]

    first = renderer.prompt(messages)
    first.append(0)  # an episode extends its own ids; the next episode of the group must not see that
    assert renderer.prompt(tuple(messages)) == expected
    assert renderer.prompt([{"role": "user", "content": "What is 2 + 4?"}]) != expected
