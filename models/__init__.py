"""Networks of the paper. Every forward returns (logits, h), h the input of the last layer `fc`."""
from models.etf import simplex_etf
from models.mlp import MLP
from models.resnet import ResNet18_adapt, resnet18, resnet34, resnet50
from utils import UserError

__all__ = ["MLP", "ResNet18_adapt", "resnet18", "resnet34", "resnet50", "simplex_etf", "build_model", "feature_dim"]

RESNETS = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}


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
    raise UserError(f"unknown model {args.model!r}; choose one of {', '.join(list(RESNETS) + ['MLP', 'ResNet18_adapt'])}")


def feature_dim(model):
    """d, the width of h."""
    return model.fc.in_features
