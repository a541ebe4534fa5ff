"""BatchNorm folded into the layer before it, for evaluation.

In eval mode a BatchNorm is a fixed per-channel affine map, y = gamma (x - mean) / sqrt(var + eps) + beta,
so a convolution or linear layer followed by one equals a single layer with scaled weights and a bias.
Validation runs the folded copy: the same function up to float rounding (the scale is computed in
float64 and the result stored in the model's dtype, so the features differ from the unfolded network's
by a few units in the last place of float32). On a CPU it makes one pass over each activation instead
of two; cuDNN adds a convolution's bias in a pass of its own, so a GPU saves less.
"""
import copy

import torch
from torch import nn

FOLDABLE = (nn.Conv2d, nn.Linear)


def fold_batchnorm(model):
    """An eval-mode copy of `model` with every BatchNorm that directly follows a conv or linear layer folded
    into it (and replaced by nn.Identity, so module names and forward hooks stay where they were).

    Pairs are found by name: `convN`/`bnN` attributes of one module (the ResNets' blocks and stem), and
    consecutive (layer, BatchNorm) children of an nn.Sequential (the MLP, the ResNets' shortcuts). A
    BatchNorm elsewhere is left as it is. `model` itself is not changed."""
    folded = copy.deepcopy(model).eval()
    for module in list(folded.modules()):
        for layer_name, bn_name in _pairs(module):
            layer, bn = getattr(module, layer_name), getattr(module, bn_name)
            if isinstance(layer, FOLDABLE) and _is_batchnorm(bn) and bn.num_features == layer.weight.shape[0]:
                setattr(module, layer_name, _folded(layer, bn))
                setattr(module, bn_name, nn.Identity())
    return folded


def _is_batchnorm(m):
    # Running statistics are what eval mode normalises with; without them a BatchNorm uses the batch's.
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None


def _pairs(module):
    """(layer attribute, BatchNorm attribute) names of the pairs in which module applies BatchNorm to a layer's output."""
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        return list(zip(names, names[1:]))
    return [(f"conv{name[2:]}", name) for name in module._modules
            if name.startswith("bn") and name[2:].isdigit() and f"conv{name[2:]}" in module._modules]


@torch.no_grad()
def _folded(layer, bn):
    """A copy of `layer` computing bn(layer(x)) in eval mode."""
    w = layer.weight.to(torch.float64)  # (C_out, ...)
    gamma, beta = (bn.weight, bn.bias) if bn.affine else (torch.ones_like(bn.running_var), torch.zeros_like(bn.running_var))
    scale = gamma.to(torch.float64) / torch.sqrt(bn.running_var.to(torch.float64) + bn.eps)  # (C_out,)
    bias = layer.bias.to(torch.float64) if layer.bias is not None else torch.zeros_like(scale)
    out = copy.deepcopy(layer)
    if out.bias is None:
        out.bias = nn.Parameter(layer.weight.new_empty(layer.weight.shape[0]))
    # reshape, not view: a channels_last weight keeps its layout (its strides) through the copy below
    out.weight.copy_(w * scale.reshape((-1,) + (1,) * (w.dim() - 1)))
    out.bias.copy_((bias - bn.running_mean.to(torch.float64)) * scale + beta.to(torch.float64))
    return out
