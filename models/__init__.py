"""Networks of the paper. Every forward returns (logits, h), h the input of the last layer `fc`."""
import torch

from models.etf import simplex_etf
from models.mlp import MLP
from models.resnet import ResNet18_adapt, resnet18, resnet34, resnet50
from nclib.base import UserError

__all__ = ["MLP", "ResNet18_adapt", "resnet18", "resnet34", "resnet50", "simplex_etf", "build_model", "build_on_device",
           "feature_dim"]

RESNETS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}
MODELS = (*RESNETS, "MLP", "ResNet18_adapt")  # the --model choices


def build_model(args, num_classes):
    """The network that the command-line arguments describe."""
    if args.model in RESNETS:
        return RESNETS[args.model](num_classes=num_classes, fc_bias=args.bias, ETF_fc=args.ETF_fc,
                                   fixdim=args.fixdim, SOTA=args.SOTA)
    if args.ETF_fc or args.fixdim:
        raise UserError(f"--ETF_fc and --fixdim apply to the ResNets, not to --model {args.model}")
    if args.model == "MLP":
        return MLP(hidden=args.width, depth=args.depth, fc_bias=args.bias, num_classes=num_classes)
    if args.model == "ResNet18_adapt":
        return ResNet18_adapt(width=args.width, num_classes=num_classes, fc_bias=args.bias)
    raise UserError(f"unknown model {args.model!r}; choose one of {', '.join(MODELS)}")


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
