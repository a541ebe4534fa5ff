"""The paper's ResNets: torchvision's, with a CIFAR stem (SOTA), a d-wide last block (fixdim) and a frozen
simplex-ETF classifier (ETF_fc); and the CIFAR ResNet18_adapt of width k.

Modules are named in torchvision's order, so torchvision's state_dicts load, and created in the order of
the code each network comes from, so that for one seed the initial weights are the authors' (and, for the
plain networks, torchvision's): torchvision's for the ResNets, the original CIFAR ResNet's for
ResNet18_adapt (its blocks create their shortcut last, see AdaptBasicBlock).
"""
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.etf import simplex_etf


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def projection(cin, cout, stride):
    return nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))


def no_shortcut():
    return None  # the identity


class BasicBlock(nn.Module):
    """shortcut() creates the shortcut: a projection (1x1 conv + BN), or None for the identity. torchvision
    creates it before the block's layers, the original CIFAR ResNet after them (AdaptBasicBlock): the
    order matters because each module's default init draws from the global generator in turn."""
    expansion = 1
    shortcut_last = False

    def __init__(self, cin, planes, stride=1, shortcut=no_shortcut, cout=None):
        super().__init__()
        downsample = None if self.shortcut_last else shortcut()
        cout = cout or planes * self.expansion  # differs from planes only in the last block under fixdim
        self.conv1, self.bn1 = conv3x3(cin, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, cout), nn.BatchNorm2d(cout)
        self.downsample = shortcut() if self.shortcut_last else downsample  # None: identity shortcut

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)), inplace=True)


class AdaptBasicBlock(BasicBlock):
    """The BasicBlock of the original CIFAR ResNet (the width study's ResNet18_adapt): it creates conv1,
    bn1, conv2, bn2 and only then its shortcut, so its default init draws in that order."""
    shortcut_last = True


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, shortcut=no_shortcut, cout=None):
        super().__init__()
        downsample = shortcut()  # first, as torchvision
        cout = cout or planes * self.expansion
        # torchvision's "ResNet v1.5": the stride is in the 3x3 conv
        self.conv1, self.bn1 = conv1x1(cin, planes), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = conv1x1(planes, cout), nn.BatchNorm2d(cout)
        self.downsample = downsample

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)), inplace=True)


class ResNet(nn.Module):
    """SOTA: 3x3 stride-1 stem and no max-pool (CIFAR style); else the ImageNet 7x7/2 stem + max-pool.
    fixdim=d > 0: the last block of layer4 outputs d channels through a 1x1 conv + BN shortcut, so h and
    the classifier are d-dimensional. ETF_fc: the classifier weight is a frozen simplex ETF; its bias trains.
    kaiming_init=False keeps PyTorch's default initialisation.
    """

    def __init__(self, block, layers, num_classes=10, fc_bias=True, ETF_fc=False, fixdim=0, SOTA=False,
                 widths=(64, 128, 256, 512), avgpool=None, kaiming_init=True):
        super().__init__()
        d = fixdim or widths[3] * block.expansion
        if ETF_fc and d < num_classes:
            raise ValueError(f"--ETF_fc needs feature dimension >= number of classes ({num_classes}), "
                             f"got {d}; raise --fixdim")
        # The creation order below is torchvision's: each module's default init draws from the global
        # generator, so creating them in another order would give other weights for the same seed.
        self.cin = widths[0]
        if SOTA:
            self.conv1 = conv3x3(3, widths[0])
        else:
            self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.Identity() if SOTA else nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], layers[0], stride=1)
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2, fixdim=fixdim)
        self.avgpool = avgpool or nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(d, num_classes, bias=fc_bias)  # before the init loop, as torchvision: its draws come first
        if kaiming_init:
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
        if ETF_fc:
            with torch.no_grad():
                self.fc.weight.copy_(simplex_etf(num_classes, d))
            self.fc.weight.requires_grad_(False)

    def _make_layer(self, block, planes, blocks, stride, fixdim=0):
        layers = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            # the last block of layer4 under fixdim: d outputs, and a projection shortcut even when d is
            # the natural width, as in the authors' network
            fixed = fixdim > 0 and i == blocks - 1
            cout = fixdim if fixed else planes * block.expansion
            shortcut = no_shortcut
            if s != 1 or self.cin != cout or fixed:
                shortcut = partial(projection, self.cin, cout, s)  # the block creates it, in its own order
            layers.append(block(self.cin, planes, s, shortcut, cout))
            self.cin = cout
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        h = torch.flatten(self.avgpool(out), 1)  # (B, d)
        return self.fc(h), h


def resnet18(num_classes=10, fc_bias=True, ETF_fc=False, fixdim=0, SOTA=False):
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, fc_bias, ETF_fc, fixdim, SOTA)


def resnet34(num_classes=10, fc_bias=True, ETF_fc=False, fixdim=0, SOTA=False):
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, fc_bias, ETF_fc, fixdim, SOTA)


def resnet50(num_classes=10, fc_bias=True, ETF_fc=False, fixdim=0, SOTA=False):
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, fc_bias, ETF_fc, fixdim, SOTA)


def ResNet18_adapt(width=64, num_classes=10, fc_bias=True):
    """CIFAR ResNet-18 with channels k, 2k, 4k, 8k (k = width), 3x3 stem, 4x4 average pool.

    PyTorch's default initialisation, as in the original width study: the Kaiming-normal init of the other
    ResNets would start it with logits about 20 times larger. Its blocks create their shortcut last, as the
    original's do, so that one seed gives the original's initial weights.
    """
    k = width
    return ResNet(AdaptBasicBlock, [2, 2, 2, 2], num_classes, fc_bias, SOTA=True,
                  widths=(k, 2 * k, 4 * k, 8 * k), avgpool=nn.AvgPool2d(4), kaiming_init=False)
