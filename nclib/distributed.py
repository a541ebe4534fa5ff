"""Everything about ranks, in one place: the process group torchrun starts, which rank is which,
rank zero's decisions, the reductions of statistics, the global BatchNorm, DDP, and what one run on
several processes cannot do. Nothing else imports torch.distributed; in a single process every
function here is the identity (or says world size 1), so single-process code never asks."""
import os
import types
import warnings
from contextlib import contextmanager

import torch
import torch.distributed as dist

from nclib.base import RefusedOnRankZero, UserError, get_device


def torchrun_env():
    """(rank, world_size, local_rank) when this process was started by torchrun, else None."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))


def init_distributed():
    """Join torchrun's process group: gloo for CPU tensors, and NCCL for CUDA ones when there is a GPU."""
    _, _, local_rank = torchrun_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")


def end_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def process_group():
    """Inside: this process has joined torchrun's process group; on the way out it leaves it."""
    init_distributed()
    try:
        yield
    finally:
        end_distributed()


def is_distributed():
    return dist.is_initialized()


def world():
    """(rank, world size) of the process group; (0, 1) in a single process."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_rank_zero():
    return world()[0] == 0


def broadcast_from_rank_zero(obj):
    """rank 0's obj on every rank (any picklable object)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rank_device(device_arg):
    """Under torchrun, each rank's device: cuda:LOCAL_RANK unless --device names the CPU (or there is no GPU)."""
    _, _, local_rank = torchrun_env()
    if (device_arg is not None and get_device(0, device_arg).type == "cpu") or not torch.cuda.is_available():
        return torch.device("cpu")
    return get_device(local_rank)


def decided_on_rank_zero(decide):
    """decide() run on rank 0 alone, its answer on every rank. A UserError it raises is raised on
    rank 0 as it is and, on the others, as RefusedOnRankZero (rank 0 says why, once)."""
    refusal, verdict = None, None
    if is_rank_zero():
        try:
            verdict = ("ok", decide())
        except UserError as e:
            refusal, verdict = e, ("refused", str(e))
    verdict = broadcast_from_rank_zero(verdict)
    if refusal is not None:
        raise refusal
    if verdict[0] == "refused":
        raise RefusedOnRankZero(verdict[1])
    return verdict[1]


# ---------------------------------------------------------------------------- reductions

def sum_over_ranks(t):
    """The sum of t over the ranks (a new tensor); t itself in one process."""
    if not dist.is_initialized():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def max_over_ranks(t):
    """The maximum of t over the ranks (a new tensor); t itself in one process."""
    if not dist.is_initialized():
        return t
    t = t.clone()
    dist.all_reduce(t, dist.ReduceOp.MAX)
    return t


def all_gather(t):
    """[every rank's t], in rank order (all of the same shape)."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def gather_rows(t):
    """Every rank's rows of t, concatenated in rank order (ranks may hold different numbers of rows)."""
    sizes = all_gather(torch.tensor([len(t)], device=t.device))
    most = int(max(sizes).item())
    padded = torch.zeros((most,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[:len(t)] = t
    return torch.cat([part[:int(n.item())] for part, n in zip(all_gather(padded), sizes)])


def merged_stats(stats):
    """The nc.NCStats of every rank's samples, on every rank. Scatters about per-rank means cannot
    simply be summed, so each rank's (n, sum, scatter, sq) is gathered and merged in rank order."""
    merged = None
    for part in zip(*(all_gather(t) for t in (stats.n, stats.sum, stats.scatter, stats.sq))):
        other = type(stats)(stats.K, stats.sum.shape[1], stats.sum.device)
        other.n, other.sum, other.scatter, other.sq = (t.clone() for t in part)
        if merged is None:
            merged = other
        else:
            merged.merge(other)
    return merged


# ---------------------------------------------------------------------------- training on several ranks

def wrap(model, device, sync_bn=False):
    """(model, net): under torchrun the forward pass runs through DDP (gradients all-reduced in
    backward) and `model` stays the plain module, whose state_dict the files hold, as in one process;
    in one process net is None (the model runs itself)."""
    if not dist.is_initialized():
        return model, None
    if sync_bn:
        model = sync_batchnorm(model, device)
    return model, torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def broadcast_buffers(model):
    """Per-rank BatchNorm statistics: rank 0's become the run's, as DDP's next forward would make them."""
    if dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def check_torchrun(args, size):
    """What one run on several processes cannot do, refused in one line."""
    if args.optimizer == "LBFGS":
        raise UserError("train_2nd_order.py (LBFGS) does not run under torchrun: its closure and line search would "
                        "need every rank to agree on each evaluation; run it as one process")
    if args.cuda_graph:
        raise UserError("--cuda_graph does not run under torchrun (DDP's gradient all-reduce is not captured); "
                        "drop the flag")
    if list(getattr(args, "measures", None) or ["paper"]) != ["paper"]:
        raise UserError("--measures are measured by one process: run without torchrun, or validate afterwards "
                        "with validate_NC.py")
    if args.loader == "torch":
        raise UserError("--loader torch does not run under torchrun (it has no per-rank sampler here); "
                        "use --loader device or auto")
    if args.batch_size % size:
        raise UserError(f"--batch_size {args.batch_size} does not split over {size} ranks: under torchrun it is the "
                        f"global batch, so give a multiple of {size}")
    if args.batch_size // size < 2:
        raise UserError(f"--batch_size {args.batch_size} over {size} ranks leaves each {args.batch_size // size} "
                        "image, and BatchNorm cannot normalise one; give a larger --batch_size")


def sync_batchnorm(model, device):
    """--sync_bn: BatchNorm over the global batch, as in one process. CUDA has nn.SyncBatchNorm; on
    the CPU (which it does not support) each BatchNorm's training forward is replaced by one that
    all-reduces the batch sums (a differentiable all-reduce, so gradients flow through them too).
    Either way the modules keep their parameter and buffer names: checkpoints are unchanged."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # its suggested replacement has no autograd; this one is still there and right
    warnings.filterwarnings("ignore", message="torch.distributed.nn.functional.all_reduce is deprecated")
    for bn in model.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            bn.forward = types.MethodType(_global_batchnorm, bn)
    return model


def _global_batchnorm(bn, x):
    if not bn.training:
        return type(bn).forward(bn, x)
    from torch.distributed.nn.functional import all_reduce
    C, dims = x.shape[1], [0] + list(range(2, x.dim()))
    count = torch.full((1,), x.numel() / C, dtype=x.dtype, device=x.device)
    totals = all_reduce(torch.cat([x.sum(dims), (x * x).sum(dims), count]))
    n = totals[-1]
    mean = totals[:C] / n
    var = totals[C:2 * C] / n - mean * mean  # biased: what BatchNorm normalises with
    if bn.track_running_stats:
        with torch.no_grad():  # kept as BatchNorm keeps them (unbiased variance)
            bn.num_batches_tracked += 1
            momentum = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked.item()
            bn.running_mean.mul_(1 - momentum).add_(momentum * mean)
            bn.running_var.mul_(1 - momentum).add_(momentum * var * n / (n - 1))
    shape = [1, C] + [1] * (x.dim() - 2)
    out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    return out * bn.weight.view(shape) + bn.bias.view(shape) if bn.affine else out
