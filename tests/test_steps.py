"""nclib/steps.py: the update rules (first-order and LBFGS steps against the authors'), and CUDA graphs:
where they are used (steps.build_step), that the graphed steps' host logic gives
the eager numbers (on the CPU, with the graph replaced by a re-run of the captured function), and on
a GPU that the real graphs give the eager numbers."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from args import train_parser
from helpers import REPO, refused, tiny_setup
import models
from nclib import losses, optimizers, steps, training
from nclib.losses import lbfgs_penalty
import train_1st_order
import train_2nd_order
import utils

pytestmark = pytest.mark.usefixtures("single_thread")

K = 3
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
FIRST_ORDER = [["--optimizer", "SGD", "--lr", "0.05"], ["--optimizer", "Adam", "--lr", "0.001"],
               ["--optimizer", "SGD", "--lr", "0.05", "--sep_decay"]]
LBFGS = [["--optimizer", "LBFGS", "--lr", "0.1", "--history_size", "5"],
         ["--optimizer", "LBFGS", "--lr", "0.1", "--sep_decay"]]


def setup(flags, device="cpu", model="MLP"):
    """(args, model, optimizer, objective, batches): a fixed start and 6 random batches of 12 images of
    K classes, the 4th of 5 (a last batch of another size)."""
    torch.manual_seed(0)
    args = train_parser(flags[1]).parse_args(["--model", model, "--width", "16", "--depth", "1", *flags])
    net = models.build_model(args, K).to(device)
    optimizer = optimizers.make_optimizer(args, net)
    objective = steps.make_objective(args, net, utils.make_criterion(args, K))
    batches = [(torch.randn(n, 3, 32, 32, device=device), torch.arange(n, device=device) % K)
               for n in (12, 12, 12, 5, 12, 12)]
    return args, net, optimizer, objective, batches


def make_step(args):
    return steps.make_lbfgs_step(args) if args.optimizer == "LBFGS" else steps.first_order_step


def trained(flags, graphed, device="cpu", lr_change_at=4, model="MLP"):
    """Losses of each step and the parameters after them; `graphed` wraps the eager step."""
    args, net, optimizer, objective, batches = setup(flags, device, model)
    step = make_step(args)
    step = graphed(step) if graphed else step
    losses = []
    for i, (x, y) in enumerate(batches):
        if i == lr_change_at:  # a new learning rate: a first-order step's graph is captured again
            for group in optimizer.param_groups:
                group["lr"] *= 0.5
        loss, logits = step(optimizer, objective, x, y)
        assert logits.shape == (len(y), K)
        losses.append(loss.clone())
    return torch.stack(losses).cpu(), [p.detach().cpu() for p in net.parameters()]


def graphed(step):
    return step.graphed() if hasattr(step, "graphed") else steps.CUDAGraphStep(step)


# ---------------------------------------------------------------------------- where graphs are used

def parsed(*flags, default="SGD"):
    return train_parser(default).parse_args(list(flags))


@pytest.mark.parametrize("default", ["SGD", "LBFGS"])
def test_auto_on_the_cpu_is_eager_without_a_note(default):
    args = parsed(default=default)
    assert args.cuda_graph is None
    step, note = steps.build_step(args, make_step, torch.device("cpu"))
    assert note is None and not isinstance(step, steps.CUDAGraphStep)


def test_auto_on_a_cuda_device_graphs_each_kind_of_step():
    cuda = torch.device("cuda")  # only looked at, never used: no GPU needed
    step, note = steps.build_step(parsed(), make_step, cuda)
    assert note is None and type(step) is steps.CUDAGraphStep and step.step is steps.first_order_step
    step, note = steps.build_step(parsed(default="LBFGS"), make_step, cuda)
    assert note is None and isinstance(step, steps.LBFGSGraphStep)
    assert isinstance(step.step, steps.LBFGSStep)
    for default in ("SGD", "LBFGS"):
        step, note = steps.build_step(parsed("--no_cuda_graph", default=default), make_step, cuda)
        assert note is None and not isinstance(step, steps.CUDAGraphStep)


def test_auto_under_torchrun_is_eager_with_a_note_naming_why():
    step, note = steps.build_step(parsed(), make_step, torch.device("cuda"), distributed=True)
    assert step is steps.first_order_step
    assert "\n" not in note and "torchrun" in note and "all-reduce" in note
    # on the CPU there are no graphs to miss: nothing to note
    assert steps.build_step(parsed(), make_step, torch.device("cpu"), distributed=True)[1] is None


@pytest.mark.parametrize("main, flags", [(train_1st_order.main, []),
                                         (train_2nd_order.main, ["--optimizer", "LBFGS"])])
def test_asking_for_a_graph_on_the_cpu_is_refused_in_one_line(capsys, tiny_argv, main, flags):
    message = refused(capsys, main, tiny_argv("graph", *flags, "--cuda_graph"))
    assert "--cuda_graph needs a CUDA device" in message and "drop the flag" in message
    assert not tiny_argv.save_dir.exists()


def test_both_spellings_together_are_refused_in_one_line(capsys, tiny_argv):
    message = refused(capsys, train_1st_order.main, tiny_argv("graph", "--cuda_graph", "--no_cuda_graph"))
    assert "--no_cuda_graph" in message and "--cuda_graph" in message
    assert not tiny_argv.save_dir.exists()


def test_the_note_goes_to_stdout_and_the_log_once(capsys, tiny_argv, monkeypatch):
    _, note = steps.build_step(parsed(), make_step, torch.device("cuda"), distributed=True)
    real = steps.build_step
    monkeypatch.setattr(training, "build_step", lambda *a, **k: (real(*a, **k)[0], note))
    run_dir = train_1st_order.main(tiny_argv("noted", "--epochs", "1"))
    assert capsys.readouterr().out.splitlines().count(note) == 1
    with open(os.path.join(run_dir, "train_log.txt")) as f:
        assert sum(line.endswith(note) for line in f.read().splitlines()) == 1


def test_a_run_records_the_value_given_and_an_old_false_resumes(tiny_argv, capsys):
    run_dir = train_1st_order.main(tiny_argv("auto", "--epochs", "1"))
    args_json = os.path.join(run_dir, "args.json")
    with open(args_json) as f:
        assert json.load(f)["cuda_graph"] is None
    assert "CUDA graph" not in capsys.readouterr().out  # the CPU: silently eager
    # a run from before the auto default recorded `false` for "not asked"
    with open(args_json) as f:
        recorded = json.load(f)
    recorded["cuda_graph"] = False
    with open(args_json, "w") as f:
        json.dump(recorded, f)
    train_1st_order.main(tiny_argv("auto", "--resume", "--epochs", "2"))
    with open(args_json) as f:
        assert json.load(f)["cuda_graph"] is False  # kept as recorded: the run goes on eagerly
    assert os.path.isfile(os.path.join(run_dir, "epoch_002.pth"))
    train_1st_order.main(tiny_argv("no", "--epochs", "1", "--no_cuda_graph"))
    with open(os.path.join(tiny_argv.save_dir, "no", "args.json")) as f:
        assert json.load(f)["cuda_graph"] is False


# ---------------------------------------------------------------------------- the host logic, on the CPU

@pytest.mark.parametrize("flags", FIRST_ORDER + LBFGS)
def test_graphed_steps_give_the_eager_numbers_bitwise(rerun_graphs, flags):
    # bitwise on every CPU: a Rerun runs the same step on the same shapes, in this process, one thread
    eager_losses, eager_params = trained(flags, None)
    losses, params = trained(flags, graphed)
    assert torch.equal(losses, eager_losses)
    assert all(torch.equal(a, b) for a, b in zip(params, eager_params))
    # warm-up steps 1-2, captured at step 3; the last batch of 5 eager; the lr change at step 5
    # captures a first-order step again (replayed at steps 5 and 6), not an LBFGS step (its rate
    # stays on the host; each of its steps 3, 5, 6 replays once per evaluation of the line search)
    if flags[1] == "LBFGS":
        assert len(rerun_graphs) == 1 and rerun_graphs[0].replays > 3
    else:
        assert [r.replays for r in rerun_graphs] == [1, 2]


@pytest.mark.parametrize("flags", [FIRST_ORDER[0], LBFGS[0]])
def test_a_default_graph_that_fails_to_capture_trains_on_eagerly_with_a_note(rerun_graphs, monkeypatch, capsys, flags):
    def fails(fn, inputs):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(steps, "Captured", fails)
    eager_losses, eager_params = trained(flags, None)

    def default(step):  # as build_step makes it when --cuda_graph is not given
        wrapped = graphed(step)
        wrapped.fallback = True
        return wrapped
    losses, params = trained(flags, default)
    assert torch.equal(losses, eager_losses)  # no batch lost or applied twice
    assert all(torch.equal(a, b) for a, b in zip(params, eager_params))
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith("note: the training step cannot be captured as a CUDA graph")
    with pytest.raises(RuntimeError, match="stream is capturing"):  # --cuda_graph insists: the error stands
        trained(flags, graphed)


def test_a_capture_that_fails_restores_the_stream_and_reports_its_own_error(monkeypatch):
    """torch.cuda.graph leaves its capture stream current when ending a broken capture fails (it exits
    the stream context only after capture_end succeeds). steps.Captured puts the caller's stream back,
    drops the graph and raises the error that broke the capture. Here on the CPU, with stand-ins that
    behave as torch's do."""
    streams = ["caller's stream"]

    class Graph:  # torch.cuda.graph: capture on its own stream; ending a broken capture raises
        def __init__(self, graph, capture_error_mode):
            pass

        def __enter__(self):
            streams.append("capture stream")

        def __exit__(self, kind, error, traceback):
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", Graph)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: streams[-1])
    monkeypatch.setattr(torch.cuda, "set_stream", streams.append)

    def step(x):
        raise RuntimeError("CUDA error: operation not permitted\nwhen stream is capturing")
    with pytest.raises(RuntimeError, match="^CUDA error: operation not permitted when stream is capturing$"):
        steps.Captured(step, (torch.zeros(2),))
    assert streams[-1] == "caller's stream"


def test_make_capturable_moves_adams_step_counters():
    args, net, optimizer, objective, batches = setup(FIRST_ORDER[1])
    steps.first_order_step(optimizer, objective, *batches[0])
    steps.make_capturable(optimizer)
    assert all(group["capturable"] for group in optimizer.param_groups)
    counters = [optimizer.state[p]["step"] for p in net.parameters()]
    assert all(s.dtype == torch.float32 and s.device == p.device for s, p in zip(counters, net.parameters()))
    sgd = setup(FIRST_ORDER[0])[2]
    steps.make_capturable(sgd)  # SGD has nothing to make capturable
    assert "capturable" not in sgd.param_groups[0]


def test_the_logged_lbfgs_loss_is_the_first_evaluation(rerun_graphs):
    """The static loss is overwritten by each later evaluation of the line search: what a graphed
    step returns is a copy of the first, the penalised loss at the parameters it started from."""
    args, net, optimizer, objective, batches = setup(LBFGS[0])
    step = steps.make_lbfgs_step(args).graphed()
    params = optimizers.trainable_parameters(net)
    for x, y in batches[:3]:
        with torch.no_grad():
            expected = lbfgs_penalty(objective(x, y)[0], params, args.weight_decay)
        loss, _ = step(optimizer, objective, x, y)
        # the same objective and penalty on the same batch (autograd or not, the same kernels): equal but
        # for the order of float32 additions of a few terms, u = 6e-8 each
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert rerun_graphs[0].replays > 1 and not torch.equal(rerun_graphs[0].outputs[0], loss)


def previous_lbfgs_step(args):
    """steps.make_lbfgs_step as it was before the graphed form, for the comparison below."""
    weight_decay = 0.0 if args.sep_decay else args.weight_decay

    def lbfgs_step(optimizer, objective, x, y):
        params = optimizer.param_groups[0]["params"]
        first = []

        def closure():
            optimizer.zero_grad(set_to_none=True)
            loss, logits = objective(x, y)
            if weight_decay:
                loss = lbfgs_penalty(loss, params, weight_decay)
            loss.backward()
            if not first:
                first.append((loss.detach(), logits.detach()))
            return loss
        optimizer.step(closure)
        return first[0]
    return lbfgs_step


@pytest.mark.parametrize("flags", LBFGS)
def test_eager_lbfgs_numbers_are_unchanged(flags):
    losses, params = trained(flags, None)
    before_losses, before_params = trained(flags, lambda step: previous_lbfgs_step(parsed(*flags, default="LBFGS")))
    assert torch.equal(losses, before_losses)
    assert all(torch.equal(a, b) for a, b in zip(params, before_params))


def test_lbfgs_steps_a_channels_last_resnet():
    """On a GPU the ResNets are channels_last, and so are their gradients, which LBFGS's
    p.grad.view(-1) cannot flatten: the step hands it contiguous ones with the same numbers."""
    torch.manual_seed(0)
    args = parsed("--model", "resnet18", "--fixdim", "8", "--optimizer", "LBFGS", default="LBFGS")
    net = models.build_model(args, K)
    x, y = torch.randn(4, 3, 32, 32), torch.arange(4) % K
    plain = [p.detach().clone() for p in net.parameters()]
    channels_last = net.to(memory_format=torch.channels_last)
    optimizer = optimizers.make_optimizer(args, channels_last)
    optimizer.param_groups[0].update(max_iter=2, max_eval=3)  # a short line search: the layout is the point
    objective = steps.make_objective(args, channels_last, utils.make_criterion(args, K))
    loss, _ = steps.make_lbfgs_step(args)(optimizer, objective, x.to(memory_format=torch.channels_last), y)
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(plain, channels_last.parameters()))


# ---------------------------------------------------------------------------- real graphs, on a GPU

@pytest.fixture
def deterministic_cudnn(monkeypatch):
    """Eager runs that repeat bit for bit, so that graph and eager can be compared closely."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)


@GPU
@pytest.mark.parametrize("flags", FIRST_ORDER + LBFGS)
def test_cuda_graphs_give_the_eager_numbers(flags, deterministic_cudnn):
    eager_losses, eager_params = trained(flags, None, "cuda")
    losses, params = trained(flags, graphed, "cuda")
    # a graph replays the eager kernels, deterministic here; what may differ is a kernel cuBLAS or cuDNN
    # picks for a captured call (workspace, another split of a sum): a few float32 roundings of the
    # loss (rtol 1e-6), carried through 6 steps into the parameters (rtol 1e-5)
    torch.testing.assert_close(losses, eager_losses, rtol=1e-6, atol=1e-7)
    for a, b in zip(params, eager_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@GPU
def test_cuda_graph_lbfgs_on_a_channels_last_resnet(deterministic_cudnn):
    flags = ["--optimizer", "LBFGS", "--lr", "0.1", "--fixdim", "8"]

    def run(wrap):
        args, net, optimizer, objective, batches = setup(flags, "cuda", "resnet18")
        net.to(memory_format=torch.channels_last)
        step = wrap(make_step(args)) if wrap else make_step(args)
        return [step(optimizer, objective, x.contiguous(memory_format=torch.channels_last), y)[0].item()
                for x, y in batches[:4]]
    eager, graph = run(None), run(graphed)
    # as above, through LBFGS's line search on a ResNet's ~20 layers of sums: 1e-5
    assert eager == pytest.approx(graph, rel=1e-5)


@GPU
@pytest.mark.parametrize("optimizer, lr", [("SGD", "0.05"), ("Adam", "0.001")])
def test_a_gpu_run_graphs_by_default_and_resumes_either_way(tiny_argv, capsys, optimizer, lr):
    flags = ["--device", "cuda", "--optimizer", optimizer, "--lr", lr, "--sample_size", "40", "--batch_size", "32"]
    eager = train_1st_order.main(tiny_argv("eager", *flags, "--epochs", "1", "--no_cuda_graph"))
    # an eager run (Adam's saved state not capturable) resumed with graphs, by the auto default
    train_1st_order.main(tiny_argv("eager", *flags, "--resume", "--epochs", "2", "--cuda_graph"))
    graph = train_1st_order.main(tiny_argv("graph", *flags, "--epochs", "2"))
    assert "note" not in capsys.readouterr().out
    a, b = (torch.load(os.path.join(d, "epoch_002.pth"), map_location="cpu", weights_only=True) for d in (eager, graph))
    # two epochs of an MLP: float32 roundings of ~3e3-term sums (~sqrt(3072) u = 3e-6 of their terms) per
    # step, carried through ~4 steps: 1e-4 relative (1e-5 absolute for entries near 0)
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-4, atol=1e-5) for k in a)


# ---------------------------------------------------------------------------- bench/graph_parity.py

@pytest.mark.slow
def test_graph_parity_bench_runs_its_eager_pair_on_the_cpu():
    flags = ["--model", "MLP", "--width", "16", "--depth", "1", "--sample_size", "5", "--epochs", "2",
             "--device", "cpu"]
    out = subprocess.run([sys.executable, "bench/graph_parity.py", *flags], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert any(line.split()[:1] == ["2"] for line in lines)  # the table's row of epoch 2
    assert "needs a GPU" in out.stdout and lines[-1] == "parity: SKIP (no GPU)"


@GPU
@pytest.mark.slow
def test_graph_parity_bench_passes_on_a_gpu():
    flags = ["--model", "MLP", "--width", "32", "--depth", "1", "--sample_size", "20", "--epochs", "2",
             "--device", "cuda", "--deterministic"]
    out = subprocess.run([sys.executable, "bench/graph_parity.py", *flags], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "parity: PASS", out.stdout[-3000:]


@GPU
def test_a_real_capture_that_fails_leaves_the_default_stream_and_trains_on_eagerly(capsys):
    """A step that syncs (loss.item()) cannot be captured: the default graph says so once, puts the
    caller's stream back and trains on eagerly, with the eager numbers."""
    def syncing_step(optimizer, objective, x, y):
        loss, logits = steps.first_order_step(optimizer, objective, x, y)
        loss.item()  # not allowed while capturing
        return loss, logits

    def default(step):
        wrapped = steps.CUDAGraphStep(lambda *a: syncing_step(*a))
        wrapped.fallback = True
        return wrapped
    flags = FIRST_ORDER[0]
    eager_losses, _ = trained(flags, lambda step: syncing_step, "cuda")
    losses, _ = trained(flags, default, "cuda")
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.testing.assert_close(losses, eager_losses, rtol=1e-6, atol=1e-7)  # eager both: as in the first GPU test
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith("note: the training step cannot be captured as a CUDA graph")


@GPU
@pytest.mark.parametrize("optimizer, lr", [("SGD", "0.05"), ("Adam", "0.001")])
def test_a_gpu_resnet_resumed_with_deterministic_switched_trains_on(tiny_argv, optimizer, lr):
    """--deterministic switched on --resume changes the ResNet's layout (NCHW <-> channels_last); the
    fused optimisers then get state in the parameters' layout (optimizers.match_parameter_layout)."""
    flags = ["--device", "cuda", "--model", "ResNet18_adapt", "--width", "8", "--optimizer", optimizer, "--lr", lr,
             "--sample_size", "20", "--batch_size", "32"]
    run = train_1st_order.main(tiny_argv("switched", *flags, "--epochs", "1"))
    train_1st_order.main(tiny_argv("switched", *flags, "--resume", "--epochs", "2", "--deterministic"))
    train_1st_order.main(tiny_argv("switched", *flags, "--resume", "--epochs", "3", "--no-deterministic"))
    state = torch.load(os.path.join(run, "epoch_003.pth"), map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v.float()).all() for v in state.values())


@pytest.mark.parametrize("flags", [["--optimizer", "SGD", "--lr", "0.05"], ["--optimizer", "Adam", "--lr", "0.001"],
                                   ["--optimizer", "SGD", "--lr", "0.05", "--sep_decay"],
                                   ["--optimizer", "SGD", "--lr", "0.05", "--loss", "RescaledMSE", "--M", "3"],
                                   ["--optimizer", "Adam", "--lr", "0.001", "--loss", "CrossEntropy"]])
def test_first_order_step_lowers_the_loss(flags):
    args, model, optimizer, objective, x, y = tiny_setup(*flags)
    before = full_loss(objective, x, y)
    for _ in range(5):
        loss, logits = steps.first_order_step(optimizer, objective, x, y)
        assert logits.shape == (12, K) and loss.dim() == 0 and not loss.requires_grad
    assert full_loss(objective, x, y) < before


def test_lbfgs_step_lowers_the_penalised_loss():
    args, model, optimizer, objective, x, y = tiny_setup("--optimizer", "LBFGS", "--lr", "0.1", default="LBFGS")
    params = optimizers.trainable_parameters(model)
    step = steps.make_lbfgs_step(args)
    before = full_loss(objective, x, y, params, args.weight_decay)
    first, _ = step(optimizer, objective, x, y)
    # the logged loss is the penalised objective at the parameters the step started from: the same forward
    # pass (same kernels, same shapes), the penalty added to the loss in another order (float32, a few u)
    assert first.item() == pytest.approx(before, rel=1e-5)
    for _ in range(2):
        step(optimizer, objective, x, y)
    assert full_loss(objective, x, y, params, args.weight_decay) < 0.9 * before


def test_lbfgs_steps_are_bitwise_the_authors_steps():
    """The authors' closure sums the penalty `0.5 * weight_decay * torch.norm(param) ** 2` over the
    parameters first and then adds it to the loss. Ours does the same ops on the same shapes in the
    same order, which rounds alike on every CPU, so every closure value of three strong-Wolfe steps
    from the same start on the same batch, and every parameter after them, is bit for bit theirs
    (adding each term to the loss in turn differed in the last bit, and the line search made that
    a different step)."""
    args, model, optimizer, objective, x, y = tiny_setup("--optimizer", "LBFGS", "--lr", "0.1", default="LBFGS")
    theirs = copy.deepcopy(model)
    their_optimizer = torch.optim.LBFGS(theirs.parameters(), lr=0.1, history_size=args.history_size,
                                        line_search_fn="strong_wolfe")
    their_values = []

    def their_closure():
        their_optimizer.zero_grad()
        logits, _ = theirs(x)
        loss = torch.nn.MSELoss()(logits, torch.nn.functional.one_hot(y, K).float())
        penalty = 0
        for param in theirs.parameters():
            penalty += 0.5 * args.weight_decay * torch.norm(param) ** 2
        loss = loss + penalty
        loss.backward()
        their_values.append(loss.detach())
        return loss
    step = RecordedLBFGSStep(args.weight_decay)
    step.values = []
    for _ in range(3):
        their_optimizer.step(their_closure)
        step(optimizer, objective, x, y)
    assert len(step.values) == len(their_values) > 3
    assert torch.equal(torch.stack(step.values), torch.stack(their_values))
    for (name, ours), theirs_p in zip(model.named_parameters(), theirs.parameters()):
        assert torch.equal(ours, theirs_p), name


def test_lbfgs_with_sep_decay_has_no_extra_penalty():
    args, model, optimizer, objective, x, y = tiny_setup("--optimizer", "LBFGS", "--sep_decay", default="LBFGS")
    before = full_loss(objective, x, y)  # MSE + the --sep_decay penalties, nothing else
    first, _ = steps.make_lbfgs_step(args)(optimizer, objective, x, y)
    assert first.item() == pytest.approx(before, rel=1e-5)  # as above


def full_loss(objective, x, y, params=(), weight_decay=0.0):
    with torch.no_grad():
        return (objective(x, y)[0] + (losses.lbfgs_penalty(0.0, params, weight_decay) if params else 0.0)).item()


class RecordedLBFGSStep(steps.LBFGSStep):
    """The LBFGS step, keeping the value of every evaluation of its closure."""
    values = None

    def evaluate(self, *args):
        loss, logits = super().evaluate(*args)
        self.values.append(loss)
        return loss, logits
