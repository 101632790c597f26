"""Our Muon, on plain tensors, is torch.optim.Muon with the AdamW-matched step size (on CPU it
orthogonalises in float32 where torch's Muon uses bfloat16, so the two agree to bfloat16's precision)."""

import pytest
import torch

from rl.trainer.optim import Muon


@pytest.mark.parametrize("shape", [(48, 32), (32, 80)], ids=["tall", "wide"])
def test_muon_matches_torch_muon(shape):
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(shape))
    reference = torch.nn.Parameter(ours.detach().clone())
    optimizers = [
        Muon([ours], lr=0.02, weight_decay=0.1),
        torch.optim.Muon([reference], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"),
    ]
    for _ in range(3):
        grad = torch.randn(shape)
        ours.grad, reference.grad = grad.clone(), grad.clone()
        for optimizer in optimizers:
            optimizer.step()
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-3)


@pytest.mark.parametrize("optimizer, muon_params", [("muon", 2), ("adamw", 0)])
def test_the_optimizer_split_puts_hidden_matrices_on_muon_unless_adamw_is_chosen(optimizer, muon_params):
    from torch import nn

    from rl.config import TrainerConfig
    from rl.trainer.optim import MuonWithAdamW

    model = nn.ModuleDict({"embed_tokens": nn.Embedding(8, 4), "up": nn.Linear(4, 4), "down": nn.Linear(4, 4)})
    split = MuonWithAdamW(model, TrainerConfig(optimizer=optimizer))
    on_muon = sum(len(g["params"]) for o in split.optimizers if isinstance(o, Muon) for g in o.param_groups)
    assert on_muon == muon_params
    assert sum(len(g["params"]) for o in split.optimizers for g in o.param_groups) == 5
