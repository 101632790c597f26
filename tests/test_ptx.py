"""K2's PTX loss: the data (loss on the assistant tokens only, tokenised as episodes are), its
training signal, and bad files, each refused with one line naming the key."""

import json

import pytest
import torch
from conftest import TINY_WORKERS
from processes import free_port
from trainer_helpers import samples, start_worker

from rl.config import ConfigError, TrainerConfig, load_config
from rl.data.ptx import PTXData, ptx_example
from rl.loop import Controller
from rollout.rendering import Renderer

CHAT = {"messages": [{"role": "user", "content": "Tom has 3 coins and finds 4 more. How many?"},
                     {"role": "assistant", "content": "The answer is \\boxed{7}."}]}


def test_a_chat_example_trains_on_the_assistant_tokens_only(tiny_policy):
    renderer = Renderer.from_pretrained(str(tiny_policy))
    sample = ptx_example(CHAT, renderer)
    prompt = renderer.prompt(CHAT["messages"][:1])
    reply = renderer.tokenizer(CHAT["messages"][1]["content"], add_special_tokens=False)["input_ids"]
    assert sample.token_ids == prompt + reply + [renderer.eos_token_id]
    assert sample.prompt_len == len(prompt) and sample.loss_mask == [1] * (len(reply) + 1)
    text = ptx_example({"text": "Ana has 5 pens."}, renderer)
    assert sum(text.loss_mask) == len(text.token_ids) - 1


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (None, "does not exist"),
        ([], "has no tokens to train on"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], ":1: has no assistant message"),
        ([{"prompt": "x"}], ':1: needs "text"'),
    ],
)
def test_bad_ptx_files_are_one_line_naming_the_key(tiny_policy, tmp_path, lines, message):
    path = tmp_path / "ptx.jsonl"
    if lines is not None:
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ConfigError, match=r"trainer\.ptx\.path: .*" + message):
        PTXData(str(path), Renderer.from_pretrained(str(tiny_policy)), 256, 0, 0)


def test_the_ptx_loss_adds_a_next_token_gradient(tiny_policy):
    config = TrainerConfig(data_parallel_size=1, micro_batch_size=4, lr=0.0)
    worker = start_worker(0, 1, free_port(), str(tiny_policy), config)
    try:
        ptx = [ptx_example(CHAT, Renderer.from_pretrained(str(tiny_policy)))] * 2
        batch = samples(4, worker.model.config.vocab_size, advantages=[0.0])
        worker.train(batch, policy_version=0)
        without = worker.model.model.embed_tokens.weight.grad.clone()
        metrics = worker.train(batch, policy_version=0, ptx=ptx, ptx_coef=0.5)
        nll, tokens = metrics["ptx_loss"]
        assert tokens == 2 * sum(ptx[0].loss_mask) and nll / tokens > 0
        assert not torch.equal(worker.model.model.embed_tokens.weight.grad, without)
        eval_nll, eval_tokens = worker.ptx_eval(ptx)
        assert eval_tokens == tokens and eval_nll / eval_tokens == pytest.approx(nll / tokens, rel=1e-5)
    finally:
        worker.shutdown()


@pytest.mark.integration
def test_a_run_with_ptx_logs_its_losses_and_coef_0_only_measures(tiny_policy, tiny_workers, tmp_path):
    path = tmp_path / "ptx.jsonl"
    path.write_text("".join(json.dumps(CHAT) + "\n" for _ in range(6)))
    overrides = [f"model.path={tiny_policy}", *TINY_WORKERS, f"trainer.ptx.path={path}", "trainer.ptx.eval_size=2",
                 "steps=1", "data.prompts_per_step=2", "rollout.n_samples=2", "data.eval_size=2"]
    for coef in (0.1, 0.0):
        run_dir = tmp_path / f"coef-{coef}"
        Controller(load_config(None, [*overrides, f"trainer.ptx.coef={coef}"]), run_dir).run(str(tiny_policy), workers=tiny_workers)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert rows[0]["ptx_eval_loss"] > 0 and rows[1]["ptx_eval_loss"] > 0
        # coef 0 only measures: nothing is mixed into the training batch.
        assert ("ptx_loss" in rows[1]) == (coef > 0)
