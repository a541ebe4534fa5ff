"""Networks of the paper. Every forward returns (logits, h), h the input of the last layer `fc`."""
from dataclasses import dataclass
from typing import Callable

import torch

from models.etf import simplex_etf
from models.mlp import MLP
from models.resnet import ResNet18_adapt, resnet18, resnet34, resnet50
from nclib.base import UserError

__all__ = ["MLP", "ResNet18_adapt", "resnet18", "resnet34", "resnet50", "simplex_etf", "build_model", "build_on_device",
           "feature_dim", "MODELS", "ModelSpec", "least_parameters"]

@dataclass(frozen=True)
class ModelSpec:
    """One --model, as the scripts see it: how to build it from the command-line arguments, and a
    lower bound on its parameter count computed without building it (checks.check_fits refuses sizes
    that cannot fit before anything is allocated), with the flags that set its size."""
    build: Callable  # build(args, num_classes) -> nn.Module whose forward(x) returns (logits, h)
    least_parameters: Callable  # least_parameters(args) -> int, from its largest weight tensors alone
    size_flags: tuple  # the flags that make it large, named in the refusal
    takes_etf: bool = False  # --ETF_fc and --fixdim apply to it


def _resnet(make):
    return lambda args, K: make(num_classes=K, fc_bias=args.bias, ETF_fc=args.ETF_fc, fixdim=args.fixdim,
                                SOTA=args.SOTA)


def _resnet_least(args):
    return 512 * args.fixdim  # the last block's shortcut maps at least 512 channels to d


def _mlp_least(args):
    return 3 * 32 * 32 * args.width + (args.depth - 1) * args.width ** 2  # a flattened 3x32x32 input, then squares


def _adapt_least(args):
    return 3 * 9 * (8 * args.width) ** 2  # three of layer4's 3x3 convolutions map 8k channels to 8k


# The --model choices, in the order --help lists them: a model registered here reaches every script.
MODELS = {
    "resnet18": ModelSpec(_resnet(resnet18), _resnet_least, ("fixdim",), takes_etf=True),
    "resnet34": ModelSpec(_resnet(resnet34), _resnet_least, ("fixdim",), takes_etf=True),
    "resnet50": ModelSpec(_resnet(resnet50), _resnet_least, ("fixdim",), takes_etf=True),
    "MLP": ModelSpec(lambda args, K: MLP(hidden=args.width, depth=args.depth, fc_bias=args.bias, num_classes=K),
                     _mlp_least, ("width", "depth")),
    "ResNet18_adapt": ModelSpec(lambda args, K: ResNet18_adapt(width=args.width, num_classes=K, fc_bias=args.bias),
                                _adapt_least, ("width",)),
}


def model_spec(name):
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return MODELS[name]


def build_model(args, num_classes):
    """The network that the command-line arguments describe."""
    spec = model_spec(args.model)
    if not spec.takes_etf and (args.ETF_fc or args.fixdim):
        raise UserError(f"--ETF_fc and --fixdim apply to the ResNets, not to --model {args.model}")
    return spec.build(args, num_classes)


def least_parameters(args):
    """A lower bound on the parameter count of the network the arguments describe (see ModelSpec)."""
    return model_spec(args.model).least_parameters(args)


def feature_dim(model):
    """d, the width of h."""
    return model.fc.in_features


def build_on_device(args, num_classes, device):
    """(model, channels_last): the network the arguments describe, on `device`. On a GPU a
    convolutional model is kept channels_last, the layout its convolutions run fastest in, and
    cuDNN picks its fastest algorithms; --deterministic sets cuDNN as the authors did instead."""
    try:
        model = build_model(args, num_classes).to(device)
    except ValueError as e:  # e.g. --ETF_fc with a feature dimension below the number of classes
        raise UserError(str(e))
    deterministic = getattr(args, "deterministic", False)
    channels_last = device.type == "cuda" and args.model != "MLP" and not deterministic
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
    return model, channels_last
