"""dK-memory: what a fixed simplex-ETF classifier with d = K saves against the learned d = 512
classifier, measured as a user would mean it, on the paper's configuration: ResNet-18 (plain
stem, as the authors' README counts it), CIFAR-shaped batches of 128 (3 x 32 x 32), SGD with
momentum and weight decay, MSE. For each: all parameters, the trainable ones, the optimiser's
state, and the peak memory of training steps (forward, backward, SGD step).

The peak is that of live tensors: on a GPU torch.cuda.max_memory_allocated; on a CPU the same
quantity from PyTorch's memory profiler (every tensor's creation and destruction in order, the
parameters counted from the start). Two steps are measured, so that the second holds SGD's
momentum buffers. The process's resident memory would be the other choice, but glibc's malloc
made it differ by 60 MB between two measurements of one configuration; the profiler's count is
the same every time.
"""
import os
import sys
from contextlib import contextmanager

import torch

BATCH = 128
CIFAR = (3, 32, 32)  # one image as the loaders give it (MNIST too: read as Grayscale(3), Resize(32))
CONFIGS = {"learned, d=512": dict(ETF_fc=False, fixdim=0), "fixed ETF, d=K": dict(ETF_fc=True, fixdim=None)}


def build(num_classes, ETF_fc, fixdim):
    """ResNet-18 (plain stem) with the classifier of a config; fixdim None means d = K."""
    from models import resnet18
    return resnet18(num_classes, fc_bias=True, ETF_fc=ETF_fc, fixdim=num_classes if fixdim is None else fixdim,
                    SOTA=False)


def counts(num_classes, config, shape=CIFAR):
    """Parameters, trainable parameters, and the feature dimension d seen on a batch of 2."""
    return model_counts(build(num_classes, **CONFIGS[config]), num_classes, shape)


def model_counts(model, num_classes, shape=CIFAR):
    """counts() of a model already built (on any device); leaves it in eval mode."""
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        x = torch.zeros(2, *shape, device=next(model.parameters()).device)  # (2, 3, 32, 32)
        logits, h = model.eval()(x)  # (2, K), (2, d)
    assert logits.shape == (2, num_classes)
    return {"params": params, "trainable": trainable, "d": h.shape[1]}


@contextmanager
def _quiet_stderr():
    """The profiler's C++ side (kineto) writes a line to stderr at each start and stop, and an error
    line where there is no GPU: not for the user's terminal."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def _profiled_peak(run):
    """Peak bytes of live CPU tensors while run() runs (tensors alive before it included)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler import _memory_profiler as mp
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                                  with_stack=True) as prof:
        run()
    live = peak = 0
    for _, action, _, size in mp.MemoryProfile(prof.profiler.kineto_results).timeline:
        if action in (mp.Action.PREEXISTING, mp.Action.CREATE):
            live += size
        elif action == mp.Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def measure(num_classes, config, device="cpu"):
    """Counts, optimiser state (bytes) and peak memory of two training steps (bytes) of a config."""
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build(num_classes, **CONFIGS[config]).to(dev)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9,
                          weight_decay=5e-4)
    x = torch.randn(BATCH, *CIFAR, device=dev)  # (B, 3, 32, 32)
    y = torch.nn.functional.one_hot(torch.randint(num_classes, (BATCH,), device=dev), num_classes).float()  # (B, K)

    def steps():
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            logits, _ = model(x)  # (B, K)
            torch.nn.functional.mse_loss(logits, y).backward()
            opt.step()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        steps()
        peak = torch.cuda.max_memory_allocated(dev)
    else:
        peak = _profiled_peak(steps)
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return {**model_counts(model, num_classes), "optimizer_state_bytes": state, "peak_step_bytes": peak,
            "device": str(dev)}


def cut(before, after):
    """after / before - 1, in percent (negative: a saving)."""
    return 100.0 * (after / before - 1)


def compare(num_classes, measure_peak=True, device="cpu"):
    """({config: numbers}, {quantity: percent change of fixed ETF d = K against learned d = 512})."""
    rows = {c: measure(num_classes, c, device) if measure_peak else counts(num_classes, c) for c in CONFIGS}
    a, b = rows["learned, d=512"], rows["fixed ETF, d=K"]
    keys = ("params", "trainable") + (("optimizer_state_bytes", "peak_step_bytes") if measure_peak else ())
    return rows, {k: cut(a[k], b[k]) for k in keys}
