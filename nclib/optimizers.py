"""Optimisers and learning-rate schedules.

SGD has momentum 0.9, Adam betas (0.9, 0.999) and eps 1e-8, both with the optimiser's weight decay
(none with --sep_decay, whose penalties are in the loss). LBFGS uses a strong-Wolfe line search;
its weight decay is a penalty in the closure (losses.lbfgs_penalty). Schedules step once per
epoch, for LBFGS too.
"""
import torch

from nclib.base import UserError

FIRST_ORDER = ("SGD", "Adam")
SECOND_ORDER = ("LBFGS",)


def trainable_parameters(model):
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(args, model):
    params = trainable_parameters(model)
    weight_decay = 0.0 if args.sep_decay else args.weight_decay
    # Fused kernels exist for CUDA; on the CPU the default keeps results bitwise reproducible.
    fused = {"fused": True} if next(model.parameters()).device.type == "cuda" else {}
    if args.optimizer == "SGD":
        return torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=weight_decay, **fused)
    if args.optimizer == "Adam":
        # Under --cuda_graph, Adam's step counter must live on the device to be captured.
        capturable = {"capturable": True} if getattr(args, "cuda_graph", False) else {}
        return torch.optim.Adam(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=weight_decay, **fused, **capturable)
    if args.optimizer == "LBFGS":
        return torch.optim.LBFGS(params, lr=args.lr, history_size=args.history_size,
                                 line_search_fn="strong_wolfe")
    raise UserError(f"unknown optimizer {args.optimizer!r}; choose one of {', '.join(FIRST_ORDER + SECOND_ORDER)}")


def parse_decay_type(decay_type):
    """'step' -> ('step', None); 'step_40_80_120' -> ('multistep', [40, 80, 120]); 'cosine'."""
    if decay_type in ("step", "cosine"):
        return decay_type, None
    parts = decay_type.split("_")
    if parts[0] == "step" and len(parts) > 1 and all(p.isdigit() and int(p) > 0 for p in parts[1:]):
        return "multistep", [int(p) for p in parts[1:]]
    raise UserError(f"unknown --decay_type {decay_type!r}; use step, step_a_b_c (e.g. step_60_120_160) or cosine")


def make_scheduler(args, optimizer):
    """StepLR(--patience, --gamma) by default; MultiStepLR for step_a_b_c; cosine over --epochs."""
    kind, milestones = parse_decay_type(args.decay_type)
    if kind == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.patience, gamma=args.gamma)
    if kind == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=args.gamma)
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)


def match_parameter_layout(optimizer):
    """Give each optimiser state tensor its parameter's memory layout. A loaded state keeps the layout
    it was saved in, and a run resumed with another (--deterministic switched: the ResNets become NCHW
    instead of channels_last; or another device) would hand the fused GPU optimisers state whose
    strides differ from their parameters'. The values are unchanged."""
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                state[key] = torch.empty_like(p).copy_(value)
