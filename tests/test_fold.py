"""BatchNorm folded into the preceding layer (models/fold.py) and validation's forward pass (EvalForward)."""
import pytest
import torch
from torch import nn

import models
from models.fold import fold_batchnorm
from nclib import measure
from nclib.steps import fp32_convolutions


def trained_statistics(model, seed=0):
    """Give every BatchNorm running statistics and affine parameters far from their initial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 3 + 0.1)
                if m.affine:
                    m.weight.copy_(torch.randn(m.num_features, generator=g))
                    m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


NETWORKS = {
    "resnet18 SOTA": lambda: models.resnet18(SOTA=True),
    "resnet18 plain": lambda: models.resnet18(),
    "resnet50 (bottleneck)": lambda: models.resnet50(num_classes=4),
    "resnet18 fixdim ETF": lambda: models.resnet18(fixdim=10, ETF_fc=True, SOTA=True),
    "ResNet18_adapt": lambda: models.ResNet18_adapt(width=4),
    "MLP": lambda: models.MLP(hidden=16, depth=3),
}


@pytest.mark.parametrize("name", NETWORKS)
def test_the_folded_network_computes_the_same_function_without_batchnorm(name):
    torch.manual_seed(0)
    model = trained_statistics(NETWORKS[name]())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert batchnorms(folded) == [] and batchnorms(model) != []
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        (z, h), (z_f, h_f) = model(x), folded(x)
    # The same function rounded otherwise: the folded weights rounded once more and BatchNorm's own
    # roundings, after every layer. Each layer's sums are then of other numbers, so their rounding errors
    # differ: ~sqrt(n) u of the terms' magnitudes for random rounding, n <= 4,608 (3x3x512), 4e-6 a layer;
    # over resnet50's ~50 layers ~sqrt(50) x 4e-6 = 3e-5 of the largest entries; hence 1e-4 (as the GPU
    # test below). Seen: up to 2e-6 (resnet50's logits; AVX-512, AVX2 and the default kernels alike).
    assert (h_f - h).abs().max() <= 1e-4 * h.abs().max()
    assert (z_f - z).abs().max() <= 1e-4 * z.abs().max()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is left as it was
    assert [n for n, _ in folded.named_children()] == [n for n, _ in model.named_children()]


def test_a_batchnorm_without_affine_parameters_folds_and_one_without_running_statistics_is_kept():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, affine=False), nn.ReLU(),
                        nn.Linear(6, 6), nn.BatchNorm1d(6, track_running_stats=False))
    trained_statistics(net)
    folded = fold_batchnorm(net)
    assert isinstance(folded[1], nn.Identity) and isinstance(folded[4], nn.BatchNorm1d)
    x = torch.randn(8, 5)
    # two layers of <= 6 terms, each form rounding ~13 times per output (the folded weights and BatchNorm
    # once or twice more) terms of magnitude up to ~5: a few ulps of outputs up to 2 (ulp 2.4e-7); seen:
    # 4 ulps. 1e-5 absolute and relative leaves a factor 10.
    with torch.no_grad():
        assert torch.allclose(folded(x), net(x), rtol=1e-5, atol=1e-5)


def test_layer_hooks_see_the_same_features_in_the_folded_network():
    torch.manual_seed(0)
    model = trained_statistics(models.MLP(hidden=16, depth=3))
    x = torch.randn(6, 3, 32, 32)
    forward = measure.EvalForward(model)
    names = measure.select_layers(forward.module, [])
    with torch.no_grad(), measure.LayerHooks(model, names) as plain, \
            measure.LayerHooks(forward.module, names) as folded:
        model(x)
        forward(x)
    # the first layer sums 3,072 terms: ~sqrt(3072) u = 3e-6 of their magnitudes (a few here) for random
    # rounding, carried through two 16-term layers: ~1e-5 absolute; seen: up to 1e-6
    for name in names:
        assert torch.allclose(folded.features[name], plain.features[name], rtol=1e-4, atol=1e-5)


def graphed_eval_forward():
    """(EvalForward of a small MLP with its graph switched on as on a GPU, its folded eager twin, batches:
    three of the full size, then a smaller last one)."""
    torch.manual_seed(0)
    model = trained_statistics(models.MLP(hidden=16, depth=2))
    forward = measure.EvalForward(model)
    forward.use_graph = True
    return forward, fold_batchnorm(model), [torch.randn(8, 3, 32, 32) for _ in range(3)] + [torch.randn(5, 3, 32, 32)]


def assert_eager_numbers(forward, eager, batches):
    # on the CPU a graph is a Rerun of the same folded module on the same shapes: the same bits
    for x in batches:
        z, h = forward(x)
        with torch.no_grad():
            z_e, h_e = eager(x)
        assert torch.equal(z, z_e) and torch.equal(h, h_e)


def test_eval_forward_captures_the_first_full_batch_and_replays_it_for_the_others(rerun_graphs):
    """The host logic of the graphed forward pass on the CPU (a Rerun for the graph): one capture,
    replayed for each full-size batch with new inputs; the smaller last batch runs eagerly."""
    forward, eager, batches = graphed_eval_forward()
    assert_eager_numbers(forward, eager, batches)
    assert len(rerun_graphs) == 1 and rerun_graphs[0].replays == 3


def test_eval_forward_whose_capture_fails_runs_eagerly_after_one_note(rerun_graphs, monkeypatch, capsys):
    def fails(fn, inputs):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(measure, "Captured", fails)
    monkeypatch.setattr(measure.EvalForward, "capture_failed", False)  # restored after the test
    forward, eager, batches = graphed_eval_forward()
    assert_eager_numbers(forward, eager, batches)
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 1 and notes[0].startswith("note: validation's forward pass cannot be captured as a CUDA "
                                                   "graph (operation not permitted when stream is capturing)")
    assert not forward.use_graph and measure.EvalForward.capture_failed  # later passes: eager, no note


def test_eval_forward_on_a_gpu_convolves_in_ieee_float32_only_while_it_runs(rerun_graphs):
    """PyTorch's default lets cuDNN round convolution inputs to TF32; validation's features must be
    float32. (On the CPU the switch is only observed: cuDNN is not used.)"""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if not hasattr(conv, "fp32_precision"):
        pytest.skip("torch < 2.9: TF32 is switched through cudnn.allow_tf32")
    forward, eager, batches = graphed_eval_forward()
    forward.cuda = True  # as on a GPU
    seen = []
    forward.module.register_forward_pre_hook(lambda module, inputs: seen.append(conv.fp32_precision))
    before = conv.fp32_precision
    assert_eager_numbers(forward, eager, batches)
    assert set(seen) == {"ieee"} and len(seen) > len(batches)  # the warm-up too
    assert conv.fp32_precision == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_eval_forward_replays_a_cuda_graph_with_the_eager_numbers():
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = trained_statistics(models.resnet18(SOTA=True)).to(device).to(memory_format=torch.channels_last)
    forward = measure.EvalForward(model)
    eager = fold_batchnorm(model)
    batches = [torch.randn(32, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
               for _ in range(3)] + [torch.randn(7, 3, 32, 32, device=device)]  # a smaller last batch runs eagerly
    # EvalForward convolves in IEEE float32; PyTorch's default lets cuDNN round to TF32 (10-bit
    # mantissas, ~1e-3 off: the first run on an H200 failed on that), so the reference must too.
    # What may still differ is the order of float32 sums if cuDNN picks another algorithm for the
    # graph: a 3x3x512 convolution sums 4,608 products, ~sqrt(4608) * 6e-8 = 4e-6 relative per layer
    # for random rounding, over ~20 layers ~2e-5; hence 1e-4 relative (atol for entries near 0).
    for x in batches:
        z, h = forward(x)
        with torch.no_grad(), fp32_convolutions():
            z_e, h_e = eager(x)
        assert torch.allclose(h, h_e, rtol=1e-4, atol=1e-5) and torch.allclose(z, z_e, rtol=1e-4, atol=1e-5)
    assert forward.graph is not None
