"""The networks: shapes, parameter counts, initial weights (bit for bit those of torchvision, of the
authors' torchvision-based ResNets and of the original CIFAR ResNet18_adapt for the same seed), and the
fixed simplex-ETF classifier."""
import argparse
import math
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torchvision
import torchvision.models.resnet as tvr

from args import train_parser
import models

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
    # h is the input of fc, as it is (not normalised); the same op on the same shapes: the same bits
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
    # a sample std of 128 x 256 x 9 = 295k normal weights: 1/sqrt(2 x 295k) = 0.13% relative spread; 5% is 38 of it
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
    torch.testing.assert_close(logits, h @ model.fc.weight.T)  # linear without a bias is this matmul


@pytest.mark.parametrize("width, depth", [(32, 1), (16, 3)])
def test_mlp(width, depth):
    model = models.MLP(hidden=width, depth=depth, fc_bias=True, num_classes=K).eval()
    with torch.no_grad():
        logits, h = model(torch.randn(4, 3, 32, 32))
    assert logits.shape == (4, K) and h.shape == (4, width)
    torch.testing.assert_close(logits, model.fc(h))  # the same op on the same shapes: the same bits
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
    torch.testing.assert_close(logits, model.fc(h))  # the same op on the same shapes: the same bits
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
    # fixdim at the natural width still adds the last block's 1x1 conv + BN shortcut: 512 * 512 + 2 * 512 more
    (True, False, 512, 11_437_130), (False, False, 512, 11_444_810),
])
def test_resnet18_trainable_parameter_counts(SOTA, ETF_fc, fixdim, expected):
    with torch.device("meta"):  # shapes without values: counting needs no initialisation
        model = models.resnet18(num_classes=K, fc_bias=True, ETF_fc=ETF_fc, fixdim=fixdim, SOTA=SOTA)
        assert n_trainable(model) == expected
        flags = ["--SOTA"] * SOTA + ["--ETF_fc"] * ETF_fc + ["--fixdim", str(fixdim)]
        assert n_trainable(cli_model(*flags)) == expected


@pytest.mark.parametrize("name, d", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_fixdim_at_natural_width_still_projects_the_last_shortcut(name, d):
    """--fixdim 512 (2048 for ResNet-50) is not the plain network: the last block gets a 1x1 conv + BN shortcut."""
    fixed = getattr(models, name)(num_classes=K, fixdim=d, SOTA=True)
    plain = getattr(models, name)(num_classes=K, SOTA=True)
    shortcut = fixed.layer4[-1].downsample
    assert plain.layer4[-1].downsample is None and shortcut is not None
    conv, bn = shortcut
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) == (d, d, (1, 1), (1, 1))
    assert conv.bias is None and bn.num_features == d
    # only the last block changes: the other blocks of layer4 keep torchvision's shortcuts
    assert [b.downsample is None for b in fixed.layer4[:-1]] == [b.downsample is None for b in plain.layer4[:-1]]
    assert fixed.fc.in_features == d


# ---------------------------------------------------------------------------- initial weights

def assert_same_tensors(ours, ref):
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)  # torchvision's names, in its order
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:5]}"
    assert [p.requires_grad for p in ours.parameters()] == [p.requires_grad for p in ref.parameters()]


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_plain_resnets_start_from_torchvision_weights(name):
    for seed in (0, 1):
        torch.manual_seed(seed)
        ours = getattr(models, name)(num_classes=K)
        torch.manual_seed(seed)
        ref = getattr(torchvision.models, name)(num_classes=K)
        assert_same_tensors(ours, ref)


class FixdimBasicBlock(tvr.BasicBlock):
    """torchvision's BasicBlock, modules created in its order, with conv2 and bn2 d wide (stride 1)."""

    def __init__(self, inplanes, planes, d, downsample):
        nn.Module.__init__(self)
        self.conv1, self.bn1 = tvr.conv3x3(inplanes, planes), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = tvr.conv3x3(planes, d), nn.BatchNorm2d(d)
        self.downsample, self.stride = downsample, 1


class FixdimBottleneck(tvr.Bottleneck):
    """torchvision's Bottleneck, modules created in its order, with conv3 and bn3 d wide (stride 1)."""

    def __init__(self, inplanes, planes, d, downsample):
        nn.Module.__init__(self)
        self.conv1, self.bn1 = tvr.conv1x1(inplanes, planes), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = tvr.conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = tvr.conv1x1(planes, d), nn.BatchNorm2d(d)
        self.relu = nn.ReLU(inplace=True)
        self.downsample, self.stride = downsample, 1


class AuthorsResNet(tvr.ResNet):
    """The authors' ResNet, built by torchvision's own constructor with their changes put in where they made
    them, so that the global generator is drawn from in the same order and amounts:
    - SOTA: the stem conv is created 3x3 stride 1 instead of 7x7 stride 2 (by intercepting its creation,
      not by replacing it afterwards, which would draw for a 7x7 kernel first); the max-pool is skipped;
    - fixdim=d: layer4's last block is created with d outputs, right after its 1x1 conv + BN shortcut (as
      torchvision creates a downsample before its block), and fc, torchvision's only Linear, is Linear(d, K);
    - fc_bias=False: fc is created without a bias;
    - ETF_fc: after torchvision's init loop, fc.weight is replaced by the simplex ETF and frozen.
    """

    def __init__(self, block, layers, num_classes, fc_bias=True, ETF_fc=False, fixdim=0, SOTA=False):
        conv_init, linear_init = nn.Conv2d.__init__, nn.Linear.__init__

        def conv(m, cin, cout, kernel_size, stride=1, padding=0, **kw):
            if SOTA and kernel_size == 7:  # the stem, torchvision's only 7x7 conv
                kernel_size, stride, padding = 3, 1, 1
            conv_init(m, cin, cout, kernel_size, stride, padding, **kw)

        def linear(m, in_features, out_features, bias=True, **kw):
            linear_init(m, fixdim or in_features, out_features, fc_bias, **kw)

        self.__dict__["fixdim"] = fixdim  # read by _make_layer, which runs inside torchvision's __init__
        with mock.patch.object(nn.Conv2d, "__init__", conv), mock.patch.object(nn.Linear, "__init__", linear):
            super().__init__(block, layers, num_classes=num_classes)
        if SOTA:
            self.maxpool = nn.Identity()
        if ETF_fc:
            C, d = num_classes, self.fc.in_features
            etf = math.sqrt(C / (C - 1)) * (torch.eye(C) - torch.full((C, C), 1.0 / C))  # (C, C)
            self.fc.weight = nn.Parameter(etf @ torch.eye(C, d), requires_grad=False)  # [etf, 0]

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        d = self.fixdim
        if planes != 512 or not d:
            return super()._make_layer(block, planes, blocks, stride, dilate)
        first = super()._make_layer(block, planes, blocks - 1, stride, dilate)
        downsample = nn.Sequential(tvr.conv1x1(self.inplanes, d), nn.BatchNorm2d(d))
        last = {tvr.BasicBlock: FixdimBasicBlock, tvr.Bottleneck: FixdimBottleneck}[block]
        last = last(self.inplanes, planes, d, downsample)
        self.inplanes = d
        return nn.Sequential(*first, last)


ARCHS = {"resnet18": (tvr.BasicBlock, [2, 2, 2, 2]), "resnet34": (tvr.BasicBlock, [3, 4, 6, 3]),
         "resnet50": (tvr.Bottleneck, [3, 4, 6, 3])}


@pytest.mark.parametrize("name, SOTA, fixdim, ETF_fc, fc_bias", [
    ("resnet18", False, 0, False, True),  # the reference itself: torchvision's network
    ("resnet18", True, 0, False, True), ("resnet18", True, 0, True, True), ("resnet18", False, 0, True, False),
    ("resnet18", True, 10, False, True), ("resnet18", True, 10, True, True), ("resnet18", False, 10, True, False),
    ("resnet18", True, 512, False, True), ("resnet18", True, 512, True, True), ("resnet18", False, 512, False, False),
    ("resnet34", True, 512, False, True), ("resnet50", True, 2048, True, True), ("resnet50", False, 10, False, True),
])
def test_resnets_start_from_the_authors_weights(name, SOTA, fixdim, ETF_fc, fc_bias):
    flags = dict(fc_bias=fc_bias, ETF_fc=ETF_fc, fixdim=fixdim, SOTA=SOTA)
    torch.manual_seed(3)
    ours = getattr(models, name)(num_classes=K, **flags)
    torch.manual_seed(3)
    ref = AuthorsResNet(*ARCHS[name], num_classes=K, **flags)
    assert_same_tensors(ours, ref)
    # and the same function: the shortcut and the skipped max-pool are wired alike
    x = tiny_input(SOTA)
    with torch.no_grad():
        logits, h = ours.eval()(x)
        torch.testing.assert_close(logits, ref.eval()(x))  # the same ops on the same shapes: the same bits
    assert h.shape == (2, fixdim or ref.fc.in_features)


class OriginalBlock(nn.Module):
    """The BasicBlock of the original CIFAR ResNet that the width study adapted, as it creates its
    modules: conv1, bn1, conv2, bn2, and only then the shortcut."""

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, kernel_size=1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class OriginalResNet18Adapt(nn.Module):
    """The original CIFAR ResNet-18 of width k, in its creation order (PyTorch's default init)."""

    def __init__(self, k, num_classes, fc_bias):
        super().__init__()
        self.conv1 = nn.Conv2d(3, k, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(k)
        cin, stages = k, []
        for planes, stride in ((k, 1), (2 * k, 2), (4 * k, 2), (8 * k, 2)):
            stages.append(nn.Sequential(OriginalBlock(cin, planes, stride), OriginalBlock(planes, planes, 1)))
            cin = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(8 * k, num_classes, bias=fc_bias)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(nn.functional.avg_pool2d(out, 4), 1))


@pytest.mark.parametrize("width, fc_bias", [(8, True), (16, True), (8, False)])
def test_resnet18_adapt_starts_from_the_original_weights(width, fc_bias):
    """Every tensor, for one seed, is the original's: its blocks create their shortcut after conv1..bn2
    (torchvision's order, shortcut first, gave other weights in the first block of layer2-4)."""
    torch.manual_seed(5)
    ours = models.ResNet18_adapt(width=width, num_classes=K, fc_bias=fc_bias)
    torch.manual_seed(5)
    ref = OriginalResNet18Adapt(width, K, fc_bias)
    a, b = ours.state_dict(), ref.state_dict()
    assert [t.shape for t in a.values()] == [t.shape for t in b.values()]  # the same tensors, in the same order
    different = [name for name, x, y in zip(a, a.values(), b.values()) if not torch.equal(x, y)]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[:5]}"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # and the same function
        torch.testing.assert_close(ours.eval()(x)[0], ref.eval()(x))


def test_resnet18_adapt_keeps_default_init():
    """PyTorch's default init draws conv and linear weights from U(-b, b), b = 1/sqrt(fan_in)
    (kaiming_uniform with a = sqrt(5)); the ResNets' Kaiming-normal init (std sqrt(2/fan_out)) would exceed b."""
    model = models.ResNet18_adapt(width=4, num_classes=K, fc_bias=True)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            assert m.weight.abs().max().item() <= 1 / math.sqrt(fan_in)
    conv = model.layer4[1].conv2  # 32 -> 32, 3x3: the largest kernel
    # U(-b, b): std b/sqrt(3); 32 x 32 x 9 = 9,216 weights: 0.7% relative spread, 5% is 7 of it
    assert conv.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 32 * 9), rel=0.05)
    # BatchNorm's defaults: weight 1, bias 0
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0)
               for m in model.modules() if isinstance(m, nn.BatchNorm2d))


# ---------------------------------------------------------------------------- the simplex ETF head

def check_simplex_etf(W, num_classes, dim):
    # W is float32: each entry rounded once (u = 6e-8 relative), so norms and Grams are exact to ~1e-7
    # (assert_close's float64 default, rtol 1e-7 plus atol 1e-7), W W^T's entries to 1e-6
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
    # linear adds the bias inside its GEMM, this after it: a rounding or two of logits of size ~1 apart,
    # inside assert_close's float32 default (atol 1e-5)
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
