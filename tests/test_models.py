"""Shapes, parameter counts and the fixed simplex-ETF classifier of the networks (SPEC.md section 3)."""
import argparse
import math

import pytest
import torch
import torch.nn as nn

import models
from args import train_parser

pytestmark = pytest.mark.usefixtures("single_thread")

K = 10


def tiny_input(SOTA, batch=2):
    """The smallest images that still reach layer4 with a 1x1 map: the plain stem divides by 4 first."""
    side = 8 if SOTA else 16
    return torch.randn(batch, 3, side, side)


def n_trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def cli_model(*flags, num_classes=K):
    """The network that the training command line `flags` describes."""
    return models.build_model(train_parser().parse_args(list(flags)), num_classes)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------- forward shapes

@pytest.mark.parametrize("name, d", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
@pytest.mark.parametrize("SOTA", [False, True])
def test_resnet_forward_returns_logits_and_fc_input(name, d, SOTA):
    model = getattr(models, name)(num_classes=K, fc_bias=True, ETF_fc=False, fixdim=0, SOTA=SOTA).eval()
    with torch.no_grad():
        logits, h = model(tiny_input(SOTA))
    assert logits.shape == (2, K)
    assert h.shape == (2, d)
    assert model.fc.in_features == d and models.feature_dim(model) == d
    # h is the input of fc, as it is (not normalised)
    torch.testing.assert_close(logits, model.fc(h))
    assert not torch.allclose(h.norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_resnet_fixdim_makes_h_d_dimensional(name):
    d = 7
    model = getattr(models, name)(num_classes=K, fc_bias=True, ETF_fc=False, fixdim=d, SOTA=True).eval()
    with torch.no_grad():
        logits, h = model(tiny_input(True))
    assert logits.shape == (2, K) and h.shape == (2, d)
    assert tuple(model.fc.weight.shape) == (K, d)


def test_resnet18_fixdim_changes_only_the_last_block():
    """The last BasicBlock maps 512 -> d: conv2 and bn2 are d wide, the identity path is a 1x1 conv + BN."""
    d = 10
    block = models.resnet18(num_classes=K, fixdim=d, SOTA=True).layer4[-1]
    assert block.conv1.in_channels == 512 and block.conv1.out_channels == 512
    assert block.conv2.out_channels == d and block.bn2.num_features == d
    convs = [m for m in block.downsample.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in block.downsample.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 1 and convs[0].kernel_size == (1, 1)
    assert (convs[0].in_channels, convs[0].out_channels) == (512, d)
    assert len(bns) == 1 and bns[0].num_features == d
    # the block before it is untouched
    assert models.resnet18(num_classes=K, SOTA=True).layer4[0].conv2.out_channels == 512


def test_resnet_stems():
    plain = models.resnet18(num_classes=K, SOTA=False)
    sota = models.resnet18(num_classes=K, SOTA=True)
    assert plain.conv1.kernel_size == (7, 7) and plain.conv1.stride == (2, 2) and plain.conv1.padding == (3, 3)
    assert sota.conv1.kernel_size == (3, 3) and sota.conv1.stride == (1, 1) and sota.conv1.padding == (1, 1)
    assert any(isinstance(m, nn.MaxPool2d) for m in plain.modules())
    assert not any(isinstance(m, nn.MaxPool2d) for m in sota.modules())


def test_resnet_init():
    model = models.resnet18(num_classes=K, SOTA=True)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    # Kaiming normal, fan_out, relu: std sqrt(2 / (out_channels * kernel area))
    conv = model.layer3[0].conv1  # 128 -> 256, 3x3
    expected = math.sqrt(2.0 / (conv.out_channels * 9))
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.05)


def test_no_bias():
    for model in (models.resnet18(num_classes=K, fc_bias=False), cli_model("--no-bias"),
                  cli_model("--model", "MLP", "--width", "16", "--depth", "1", "--no-bias"),
                  cli_model("--model", "ResNet18_adapt", "--width", "4", "--no-bias")):
        assert model.fc.bias is None
        assert not any(name.startswith("fc.bias") for name in model.state_dict())
    model = models.resnet18(num_classes=K, fc_bias=False).eval()
    with torch.no_grad():
        logits, h = model(tiny_input(False))
    torch.testing.assert_close(logits, h @ model.fc.weight.T)


@pytest.mark.parametrize("width, depth", [(32, 1), (16, 3)])
def test_mlp(width, depth):
    model = models.MLP(hidden=width, depth=depth, fc_bias=True, num_classes=K).eval()
    with torch.no_grad():
        logits, h = model(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, K) and h.shape == (4, width)
    torch.testing.assert_close(logits, model.fc(h))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not model.fc]
    assert len(linears) == depth and linears[0].in_features == 3 * 32 * 32
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == depth
    # the command line builds the same thing
    assert n_trainable(cli_model("--model", "MLP", "--width", str(width), "--depth", str(depth))) == n_trainable(model)


def test_resnet18_adapt():
    k = 4
    model = models.ResNet18_adapt(width=k, num_classes=K, fc_bias=True).eval()
    with torch.no_grad():
        logits, h = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, K) and h.shape == (2, 8 * k)
    assert model.fc.in_features == 8 * k
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    widths = [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels,
              model.layer3[0].conv1.out_channels, model.layer4[0].conv1.out_channels]
    assert widths == [k, 2 * k, 4 * k, 8 * k]
    torch.testing.assert_close(logits, model.fc(h))
    assert n_trainable(cli_model("--model", "ResNet18_adapt", "--width", str(k))) == n_trainable(model)


def test_build_model_other_class_counts():
    model = cli_model("--model", "resnet18", num_classes=3).eval()
    with torch.no_grad():
        logits, h = model(torch.randn(2, 3, 84, 84))  # mini-ImageNet sized input
    assert logits.shape == (2, 3) and h.shape == (2, 512)


# ---------------------------------------------------------------------------- parameter counts

@pytest.mark.parametrize("SOTA, ETF_fc, fixdim, expected", [
    (True, False, 0, 11_173_962), (True, True, 0, 11_168_842), (True, False, 10, 8_859_862), (True, True, 10, 8_859_762),
    (False, False, 0, 11_181_642), (False, True, 0, 11_176_522), (False, False, 10, 8_867_542), (False, True, 10, 8_867_442),
])
def test_resnet18_trainable_parameter_counts(SOTA, ETF_fc, fixdim, expected):
    model = models.resnet18(num_classes=K, fc_bias=True, ETF_fc=ETF_fc, fixdim=fixdim, SOTA=SOTA)
    assert n_trainable(model) == expected
    flags = ["--SOTA"] * SOTA + ["--ETF_fc"] * ETF_fc + ["--fixdim", str(fixdim)]
    assert n_trainable(cli_model(*flags)) == expected


# ---------------------------------------------------------------------------- the simplex ETF head

def check_simplex_etf(W, num_classes, dim):
    W = W.detach().double()
    assert tuple(W.shape) == (num_classes, dim)
    torch.testing.assert_close(W.norm(dim=1), torch.ones(num_classes, dtype=torch.float64))
    assert (W.pow(2).sum() / num_classes).item() == pytest.approx(1.0)
    centring = torch.eye(num_classes, dtype=torch.float64) - 1.0 / num_classes
    torch.testing.assert_close(W @ W.T, num_classes / (num_classes - 1) * centring, atol=1e-6, rtol=0)
    assert torch.all(W[:, num_classes:] == 0)


@pytest.mark.parametrize("K_, d", [(10, 10), (10, 512), (3, 7), (2, 2)])
def test_simplex_etf_function(K_, d):
    check_simplex_etf(models.simplex_etf(K_, d), K_, d)


@pytest.mark.parametrize("fixdim, d", [(0, 512), (10, 10), (16, 16)])
def test_etf_head_is_frozen_simplex_with_trainable_bias(fixdim, d):
    model = models.resnet18(num_classes=K, fc_bias=True, ETF_fc=True, fixdim=fixdim, SOTA=True)
    assert model.fc.weight.requires_grad is False
    assert model.fc.bias is not None and model.fc.bias.requires_grad is True
    check_simplex_etf(model.fc.weight, K, d)
    with torch.no_grad():
        logits, h = model.eval()(tiny_input(True))
    assert logits.shape == (2, K) and h.shape == (2, d)
    torch.testing.assert_close(logits, h @ model.fc.weight.T + model.fc.bias)
    # the head is the same through the command line, with the --ETF alias
    torch.testing.assert_close(cli_model("--ETF", "--SOTA", "--fixdim", str(fixdim)).fc.weight, model.fc.weight)


def test_etf_head_without_bias():
    model = models.resnet18(num_classes=K, fc_bias=False, ETF_fc=True, SOTA=True)
    assert model.fc.bias is None and model.fc.weight.requires_grad is False
    check_simplex_etf(model.fc.weight, K, 512)


def test_etf_head_stays_fixed_under_training():
    torch.manual_seed(1)
    args = train_parser().parse_args(["--ETF", "--SOTA", "--fixdim", "10", "--lr", "0.5"])
    model = models.build_model(args, K)
    from utils import make_optimizer
    opt = make_optimizer(args, model)
    W0, b0 = model.fc.weight.detach().clone(), model.fc.bias.detach().clone()
    logits, h = model(tiny_input(True, batch=4))
    logits.pow(2).sum().backward()
    opt.step()
    assert torch.equal(model.fc.weight, W0)
    assert not torch.equal(model.fc.bias, b0)


@pytest.mark.parametrize("fixdim", [5, 9])
def test_etf_with_fixdim_below_classes_is_refused(fixdim):
    with pytest.raises(ValueError, match="fixdim"):
        models.resnet18(num_classes=K, ETF_fc=True, fixdim=fixdim)
    with pytest.raises(ValueError):
        models.simplex_etf(K, fixdim)


def test_etf_and_fixdim_refused_for_non_resnets():
    from utils import UserError
    for flags in (["--model", "MLP", "--ETF"], ["--model", "ResNet18_adapt", "--fixdim", "10"]):
        with pytest.raises(UserError):
            cli_model(*flags, "--width", "8", "--depth", "1")


def test_args_namespace_is_enough():
    """build_model needs only the recorded training arguments (what validation reads back)."""
    recorded = vars(train_parser().parse_args(["--model", "MLP", "--width", "8", "--depth", "2"]))
    model = models.build_model(argparse.Namespace(**recorded), K)
    assert isinstance(model, models.MLP)
