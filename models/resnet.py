"""torchvision-style ResNets with the paper's options, and the CIFAR ResNet18_adapt of width k."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.etf import simplex_etf


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def shortcut(cin, cout, stride):
    """Identity when the shape is kept, else a 1x1 conv + BN."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, cout=None):
        super().__init__()
        cout = cout or planes * self.expansion  # cout != planes only for the last block under --fixdim
        self.conv1, self.bn1 = conv3x3(cin, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, cout), nn.BatchNorm2d(cout)
        self.downsample = shortcut(cin, cout, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.downsample(x), inplace=True)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, cout=None):
        super().__init__()
        cout = cout or planes * self.expansion
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = shortcut(cin, cout, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.downsample(x), inplace=True)


class ResNet(nn.Module):
    """ResNet for 32x32 (or larger) images.

    SOTA: 3x3 stride-1 stem without max-pool (CIFAR style); else the ImageNet 7x7/2 stem + max-pool.
    fixdim=d: the last block of layer4 outputs d channels, so h and the classifier are d-dimensional.
    ETF_fc: the classifier is frozen to a simplex ETF; its bias (if any) still trains.
    """

    def __init__(self, block, layers, num_classes=10, fc_bias=True, ETF_fc=False, fixdim=0, SOTA=False,
                 widths=(64, 128, 256, 512), avgpool=None):
        super().__init__()
        self.cin = widths[0]
        # Parameter names follow torchvision's, so its state_dicts load into the plain-stem models.
        if SOTA:
            self.conv1, self.maxpool = conv3x3(3, widths[0]), nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = self._make_layer(block, widths[0], layers[0], stride=1)
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2, last_cout=fixdim or None)
        self.avgpool = avgpool or nn.AdaptiveAvgPool2d(1)
        d = self.cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.fc = nn.Linear(d, num_classes, bias=fc_bias)
        if ETF_fc:
            if d < num_classes:
                raise ValueError(f"--ETF_fc needs feature dimension >= number of classes ({num_classes}), "
                                 f"got {d}; raise --fixdim")
            self.fc.weight.data.copy_(simplex_etf(num_classes, d))
            self.fc.weight.requires_grad_(False)

    def _make_layer(self, block, planes, blocks, stride, last_cout=None):
        layers = []
        for i in range(blocks):
            cout = last_cout if i == blocks - 1 else None
            layers.append(block(self.cin, planes, stride if i == 0 else 1, cout=cout))
            self.cin = cout or planes * block.expansion
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
    """CIFAR ResNet-18 with channels k, 2k, 4k, 8k (k = width), 3x3 stem, 4x4 average pool."""
    k = width
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, fc_bias, SOTA=True,
                  widths=(k, 2 * k, 4 * k, 8 * k), avgpool=nn.AvgPool2d(4))
