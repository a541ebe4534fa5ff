"""Making a step, in one place: the update rules (first-order, LBFGS's closure), the objective they
minimise, and how a step runs on a GPU, eagerly or replayed as a CUDA graph (capture, warm-up,
capturable optimisers, the fallback when a capture fails). Nothing else uses CUDA graphs.

A step is `step(optimizer, objective, x, y) -> (loss, logits)`: `objective(x, y)` runs the forward
pass and returns (loss, logits); the step turns it into an update. The logged training accuracy
comes from those logits, so no second forward pass is made.
"""
import sys
from contextlib import contextmanager, nullcontext

import torch

from nclib.base import UserError
from nclib.distributed import is_distributed, world
from nclib.losses import lbfgs_penalty, sep_decay_penalty

WARMUP = 2  # eager steps before the first capture: they create optimiser state and tune cuDNN


# ---------------------------------------------------------------------------- the update rules

def first_order_step(optimizer, objective, x, y):
    loss, logits = objective(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()  # weight decay is the optimiser's (none with --sep_decay: the loss holds it)
    return loss.detach(), logits.detach()


class LBFGSStep:
    """LBFGS re-evaluates the loss inside its line search, so the step is a closure. It has no
    weight decay of its own: the closure adds 0.5 * wd * ||p||^2 for every trainable parameter (the
    same minimiser that SGD's decay aims at), except with --sep_decay, whose penalty the objective
    already holds. The logged loss and logits are those of the first evaluation, at the parameters
    the step starts from."""

    def __init__(self, weight_decay):
        self.weight_decay = weight_decay

    def evaluate(self, optimizer, objective, x, y):
        """The closure's body: (penalised loss, logits) at the current parameters, gradients in p.grad."""
        params = optimizer.param_groups[0]["params"]
        optimizer.zero_grad(set_to_none=True)
        loss, logits = objective(x, y)
        if self.weight_decay:
            loss = lbfgs_penalty(loss, params, self.weight_decay)
        loss.backward()
        for p in params:
            # LBFGS flattens gradients with p.grad.view(-1), which a channels_last gradient (a ResNet
            # on a GPU) cannot give; a contiguous copy holds the same numbers. No copy on the CPU.
            if p.grad is not None and not p.grad.is_contiguous():
                p.grad = p.grad.contiguous()
        return loss.detach(), logits.detach()

    def __call__(self, optimizer, objective, x, y):
        first = []

        def closure():
            loss, logits = self.evaluate(optimizer, objective, x, y)
            if not first:
                first.append((loss, logits))
            return loss
        optimizer.step(closure)
        return first[0]

    def graphed(self):
        return LBFGSGraphStep(self)


def make_lbfgs_step(args):
    """The LBFGS step of these arguments (see LBFGSStep)."""
    return LBFGSStep(0.0 if args.sep_decay else args.weight_decay)


def make_objective(args, model, criterion, net=None):
    """objective(x, y) -> (loss, logits): forward pass (autocast if asked), loss and --sep_decay penalty.
    `net` runs the forward pass when it is not the model itself (DistributedDataParallel around it)."""
    net = model if net is None else net
    net = torch.compile(net) if args.compile else net
    # Under torchrun DDP averages the ranks' gradients, and the feature penalty is a sum over the
    # rank's share of the batch: scaled by the world size, the average is the one-process sum.
    if args.sep_decay:
        feature_decay_rate = args.feature_decay_rate * (world()[1] if is_distributed() else 1)
    device_type = next(model.parameters()).device.type
    # No autocast weight cache: it would outlive a CUDA graph's capture.
    autocast = (lambda: torch.autocast(device_type, dtype=torch.bfloat16, cache_enabled=False)) \
        if args.amp == "bf16" else nullcontext

    def objective(x, y):
        with autocast():
            logits, h = net(x)
            loss = criterion(logits.float(), y)
        if args.sep_decay:
            loss = loss + sep_decay_penalty(model, h, args.weight_decay, feature_decay_rate)
        return loss, logits.float()
    return objective


# ---------------------------------------------------------------------------- CUDA graphs


def build_step(args, make_step, device, distributed=False):
    """(step, note): the step `make_step(args)` to train with, replayed as a CUDA graph or not, and
    a one-line note for stdout and the run's log when the default trains eagerly on a CUDA device
    (None otherwise). The one place that decides: --no_cuda_graph (False) never graphs; --cuda_graph
    (True) insists, and is refused where a graph cannot be used; the default (None) graphs where one
    can be used, and on the CPU, which has no graphs, trains eagerly without a word.

    A step that is not captured whole (LBFGS: its line search decides on the host) provides its own
    graphed form as `step.graphed()`; any other step is captured whole by CUDAGraphStep."""
    step = make_step(args)
    if args.cuda_graph is False:
        return step, None
    if device.type != "cuda":
        if args.cuda_graph:
            raise UserError(f"--cuda_graph needs a CUDA device, and this run is on {device}; drop the flag "
                            "(or, resuming a run that recorded it, add --no_cuda_graph)")
        return step, None
    if distributed:  # --cuda_graph itself is refused before this, by check_torchrun
        return step, "note: eager steps, no CUDA graph: under torchrun DDP's gradient all-reduce is not captured"
    graphed = getattr(step, "graphed", None)
    graph_step = graphed() if graphed is not None else CUDAGraphStep(step)
    graph_step.fallback = args.cuda_graph is None  # the default: a step that fails to capture runs eagerly
    return graph_step, None


def make_capturable(optimizer):
    """Adam's step() refuses to be captured unless its groups say `capturable`, which needs each
    step counter on its parameter's device. The counters of a fused Adam are there already, and the
    fused kernel ignores the flag: the numbers stay the same. (A run started eagerly, or resumed
    from one, has the flag off in its saved state.)"""
    for group in optimizer.param_groups:
        if "capturable" not in group or group["capturable"]:
            continue
        group["capturable"] = True
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


class CUDAGraphStep:
    """A first-order step (forward, loss, backward, optimiser step) replayed as one CUDA graph.

    Eager PyTorch launches some hundreds of small kernels per ResNet step, and at batch 128 a
    fast GPU waits on those launches; a graph launches them all at once. The kernels are the same,
    so the numbers are too. The graph has the shape of the first batch; batches of another size
    (the last of an epoch) run eagerly. The learning rate is baked into a first-order step's graph,
    so it is captured again when the rate changes. Subclasses (the LBFGS step) change what is
    captured (capture) and how a step uses it (run).

    With `fallback` (the default's graphs, not --cuda_graph's), a step whose capture fails is said
    in one line and the run goes on eagerly from that batch on: nothing has run yet when a capture
    fails (it only records), so no batch is lost or applied twice."""

    fallback = False

    def __init__(self, step):
        self.step, self.captured, self.shape, self.warm, self.baked = step, None, None, 0, None
        self.eager = False  # set for good when a capture failed

    def __call__(self, optimizer, objective, x, y):
        if self.shape is None:
            self.shape = x.shape
        if x.shape != self.shape or self.eager:
            return self.step(optimizer, objective, x, y)
        baked = self.baked_in(optimizer)
        if baked != self.baked:
            if self.captured is not None:  # the gradients live in the old graph's memory: let it go with them
                optimizer.zero_grad(set_to_none=True)
            self.captured, self.baked = None, baked
        with torch.cuda.device(x.device):  # streams and capture on the run's GPU (--gpu_id 1 too)
            if self.captured is None:
                if self.warm < WARMUP:
                    self.warm += 1
                    return on_side_stream(self.step, optimizer, objective, x, y)
                try:
                    self.captured = self.capture(optimizer, objective, x, y)
                except RuntimeError as e:
                    if not self.fallback:
                        raise
                    self.eager = True
                    print(f"note: the training step cannot be captured as a CUDA graph "
                          f"({' '.join(str(e).split())[:160]}); training on eagerly (--no_cuda_graph "
                          "says so from the start)", file=sys.stderr)
                    return self.step(optimizer, objective, x, y)
            else:
                self.captured.load(x, y)
            return self.run(optimizer)

    def baked_in(self, optimizer):
        """What the graph holds as constants; when it changes, the step is captured again."""
        return tuple(group["lr"] for group in optimizer.param_groups)

    def capture(self, optimizer, objective, x, y):
        make_capturable(optimizer)
        return Captured(lambda x, y: self.step(optimizer, objective, x, y), (x, y))

    def run(self, optimizer):
        """One training step on the batch just loaded: (loss, logits)."""
        return self.captured.replay()


class LBFGSGraphStep(CUDAGraphStep):
    """The LBFGS step with its closure's evaluation (zero gradients, forward, penalty, backward)
    replayed as a CUDA graph; the line search stays on the host and replays it as often as it needs.
    LBFGS moves the parameters in place, so the graph sees them where they were captured. Its
    gradients live in the graph's memory, and p.grad points at them for LBFGS to read. The batch
    is loaded once per step (CUDAGraphStep); a last batch of another size runs eagerly."""

    def baked_in(self, optimizer):
        return None  # the learning rate stays on the host, in the line search

    def capture(self, optimizer, objective, x, y):
        self.params = optimizer.param_groups[0]["params"]
        # With no gradients at capture, backward writes them into the graph's memory instead of adding.
        optimizer.zero_grad(set_to_none=True)
        captured = Captured(lambda x, y: self.step.evaluate(optimizer, objective, x, y), (x, y))
        self.grads = [p.grad for p in self.params]
        return captured

    def run(self, optimizer):
        for p, grad in zip(self.params, self.grads):
            p.grad = grad  # an eager step (a last batch) may have replaced them
        first = []

        def closure():
            loss, logits = self.captured.replay()
            if not first:  # copied on the device before the next evaluation overwrites them
                first.append((loss.clone(), logits.clone()))
            return loss
        optimizer.step(closure)
        return first[0]


@contextmanager
def fp32_convolutions():
    """cuDNN convolutions in IEEE float32 inside. PyTorch lets them round their inputs to TF32 by
    default (10-bit mantissas: features off by ~1e-3 relative), which training may keep, as the
    authors' runs did, but measured features must not."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    owner, name, value = (conv, "fp32_precision", "ieee") if hasattr(conv, "fp32_precision") \
        else (torch.backends.cudnn, "allow_tf32", False)  # torch < 2.9
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def on_side_stream(fn, *args):
    """fn(*args) run eagerly on a side stream, ordered after and before the current stream's work, as
    the warm-up before a capture should be (lazily created state then belongs to no capture)."""
    current = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(current)
    with torch.cuda.stream(side):
        out = fn(*args)
    current.wait_stream(side)
    return out


class Captured:
    """fn(*inputs) recorded once as a CUDA graph on static copies of `inputs`. load() copies new
    inputs into them, replay() runs the recorded kernels and returns fn's outputs, which live in
    the graph's memory: the next replay overwrites them."""

    def __init__(self, fn, inputs):
        self.inputs = [t.clone() for t in inputs]
        self.graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.current_stream()
        try:
            # Records; nothing runs until replay(). Thread-local: a DataLoader's pin-memory thread may
            # allocate pinned memory meanwhile, which the global mode would count as breaking the capture.
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.outputs = fn(*self.inputs)
        except RuntimeError as e:
            # When fn breaks the capture, ending it fails too, and torch.cuda.graph then leaves its
            # capture stream current: the caller's stream is restored, the half-made graph released,
            # and the error raised is fn's, not the one about the capture's end.
            torch.cuda.set_stream(stream)
            self.graph = None
            raise RuntimeError(" ".join(str(e.__context__ or e).split())) from e

    def load(self, *inputs):
        for static, t in zip(self.inputs, inputs):
            static.copy_(t)

    def replay(self):
        self.graph.replay()
        return self.outputs
