"""nclib/optimizers.py: the optimisers' settings, the frozen ETF classifier left out, the learning-rate
schedules, and a resumed optimiser state in its parameters' memory layout."""
import pytest
import torch

from args import train_parser
import models
from helpers import tiny_setup
from nclib import optimizers
import utils

pytestmark = pytest.mark.usefixtures("single_thread")


def test_optimizer_settings():
    _, model, sgd, *_ = tiny_setup("--optimizer", "SGD", "--lr", "0.05", "--weight_decay", "1e-3")
    group = sgd.param_groups[0]
    assert isinstance(sgd, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.05, 0.9, 1e-3)
    assert sum(p.numel() for p in group["params"]) == sum(p.numel() for p in model.parameters())
    _, _, adam, *_ = tiny_setup("--optimizer", "Adam", "--lr", "0.001")
    group = adam.param_groups[0]
    assert isinstance(adam, torch.optim.Adam)
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.999), 1e-8, 5e-4)
    _, _, lbfgs, *_ = tiny_setup("--optimizer", "LBFGS", "--history_size", "7", default="LBFGS")
    group = lbfgs.param_groups[0]
    assert isinstance(lbfgs, torch.optim.LBFGS)
    assert (group["history_size"], group["line_search_fn"]) == (7, "strong_wolfe")
    for name in ("SGD", "Adam"):
        _, _, opt, *_ = tiny_setup("--optimizer", name, "--sep_decay")
        assert all(g["weight_decay"] == 0 for g in opt.param_groups)


def test_optimizer_skips_the_frozen_etf_weight():
    args = train_parser().parse_args(["--ETF", "--fixdim", "10", "--SOTA"])
    model = models.build_model(args, 10)
    params = {id(p) for g in utils.make_optimizer(args, model).param_groups for p in g["params"]}
    assert id(model.fc.weight) not in params and id(model.fc.bias) in params


@pytest.mark.parametrize("decay_type, epochs, lrs", [
    ("step", 5, [0.1, 0.1, 0.01, 0.01, 0.001]),  # --patience 2
    ("step_1_3", 4, [0.1, 0.01, 0.01, 0.001]),
    ("cosine", 4, [0.1, 0.1 * (1 + 2 ** -0.5) / 2, 0.05, 0.1 * (1 - 2 ** -0.5) / 2]),
])
def test_schedulers(decay_type, epochs, lrs):
    args, model, optimizer, *_ = tiny_setup("--lr", "0.1", "--decay_type", decay_type, "--patience", "2",
                                            "--epochs", str(epochs))
    scheduler = utils.make_scheduler(args, optimizer)
    seen = []
    for _ in range(epochs):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx(lrs)  # Python floats from the schedules' formulas: ~1e-16 apart


@pytest.mark.parametrize("make", [lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), torch.optim.Adam],
                         ids=["SGD", "Adam"])
def test_a_resumed_optimiser_state_takes_its_parameters_layout(make):
    """--deterministic switched on --resume turns a GPU run's ResNet from channels_last to NCHW (or
    back); the loaded momentum and Adam moments follow it, since the fused GPU optimisers need the
    strides of state and parameter equal. Their values stay the same."""
    torch.manual_seed(0)
    saved = models.ResNet18_adapt(width=4)  # NCHW
    optimizer = make(saved.parameters())
    saved(torch.randn(2, 3, 32, 32))[0].square().sum().backward()
    optimizer.step()
    model = models.ResNet18_adapt(width=4).to(memory_format=torch.channels_last)
    resumed = make(model.parameters())
    resumed.load_state_dict(optimizer.state_dict())

    def states():  # (parameter, its loaded state tensor, the saved one) for state of the parameter's shape
        return [(p, resumed.state[p][k], optimizer.state[q][k]) for p, q in zip(model.parameters(), saved.parameters())
                for k in resumed.state[p] if resumed.state[p][k].shape == p.shape]
    assert any(v.stride() != p.stride() for p, v, _ in states())  # as loaded: the saved layout
    optimizers.match_parameter_layout(resumed)
    assert all(v.stride() == p.stride() and torch.equal(v, before) for p, v, before in states())
