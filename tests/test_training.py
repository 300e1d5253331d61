"""A few optimizer steps on every trainable method: the loss falls, only the prompt learner gets
gradients and changes, CLIP stays as it was."""

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from helpers import MIXED_NAMES, make_model
from test_maple import NAMES, vit_model

import promptcore
from promptcore.cocoop import CoCoOp
from promptcore.maple import MaPLe


def _data(n: int, n_cls: int) -> Tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, 32, 32, generator=gen)
    return images, torch.randint(0, n_cls, (n,), generator=gen)


@dataclass
class Case:
    build: Callable[[], torch.nn.Module]
    data: Callable[[], Tuple[torch.Tensor, torch.Tensor]]
    steps: int
    lr: float
    margin: float  # the loss must fall by more than this
    trainable: Optional[List[str]] = None  # None: every prompt-learner parameter


CASES = {
    "coop": Case(lambda: promptcore.CoOp(make_model(), MIXED_NAMES, n_ctx=4, seed=0),
                 lambda: _data(8, len(MIXED_NAMES)), steps=8, lr=0.5, margin=1e-3, trainable=["prompt_learner.ctx"]),
    "cocoop": Case(lambda: CoCoOp(make_model(), MIXED_NAMES, seed=0), lambda: _data(6, len(MIXED_NAMES)),
                   steps=6, lr=0.5, margin=1e-3,
                   trainable=["prompt_learner.ctx", "prompt_learner.meta_net.linear1.weight",
                              "prompt_learner.meta_net.linear1.bias", "prompt_learner.meta_net.linear2.weight",
                              "prompt_learner.meta_net.linear2.bias"]),
    "maple": Case(lambda: MaPLe(vit_model(), NAMES, depth=2, seed=0),
                  lambda: (torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)),
                           torch.tensor([0, 1, 2, 3])),
                  steps=3, lr=1.0, margin=0.0),
}


@pytest.mark.parametrize("method", list(CASES))
def test_training_steps_move_only_the_prompts(method):
    case = CASES[method]
    module = case.build().train()
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    learner = [f"prompt_learner.{n}" for n, _ in module.prompt_learner.named_parameters()]
    assert trainable == (case.trainable if case.trainable is not None else learner) and trainable == learner
    clip_before = {k: v.clone() for k, v in module.model.state_dict().items()}
    images, labels = case.data()
    opt = torch.optim.SGD(module.prompt_learner.parameters(), lr=case.lr)
    losses = []
    for _ in range(case.steps):
        loss = F.cross_entropy(module(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - case.margin, losses
    assert all(p.grad is None for p in module.model.parameters())
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in module.prompt_learner.parameters())
    for k, v in module.model.state_dict().items():
        assert torch.equal(v, clip_before[k]), k
