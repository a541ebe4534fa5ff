import torch.nn as nn


class MLP(nn.Module):
    """Flatten a 3x32x32 image, then `depth` x [Linear, BatchNorm1d, ReLU] of width `hidden`, then fc."""

    def __init__(self, hidden=1024, depth=6, fc_bias=True, num_classes=10, in_features=3 * 32 * 32):
        super().__init__()
        layers, width = [], in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            width = hidden
        self.features = nn.Sequential(nn.Flatten(), *layers)
        self.fc = nn.Linear(hidden, num_classes, bias=fc_bias)

    def forward(self, x):
        h = self.features(x)  # (B, hidden)
        return self.fc(h), h
