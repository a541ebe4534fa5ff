"""The authors' helper names, kept for the scripts researchers wrote against their code:
`make_optimizer(args, model)`, `make_scheduler(args, optimizer)`, `make_criterion(args)`, `set_seed(seed)`
and `get_device()`. The library itself is nclib/; these names only point into it."""
from nclib.base import UserError, get_device, set_seed
from nclib.losses import make_criterion
from nclib.optimizers import make_optimizer, make_scheduler

__all__ = ["UserError", "get_device", "set_seed", "make_criterion", "make_optimizer", "make_scheduler"]
