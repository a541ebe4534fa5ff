"""nclib/losses.py: the losses and the weight-decay penalties, each against its formula on a hand-made
case, and a loss registered in one place (losses.register) training through both scripts."""
import math

import pytest
import torch
import torch.nn as nn

from args import train_parser
import models
from nclib import base, losses
import utils

pytestmark = pytest.mark.usefixtures("single_thread")

# Two samples, three classes, logits chosen by hand. The expected values are exact (or float64): a float32
# loss of a few terms is within a few u = 6e-8 of them, inside pytest.approx's default rel=1e-6.
Z = torch.tensor([[1.0, 2.0, 0.0],
                  [0.5, -1.0, 3.0]])
Y = torch.tensor([1, 2])


def criterion(*flags, num_classes=3):
    return utils.make_criterion(train_parser().parse_args(list(flags)), num_classes)


def test_mse_is_the_mean_over_all_B_times_K_entries():
    # sample 0, target (0, 1, 0): 1 + 1 + 0 = 2; sample 1, target (0, 0, 1): 0.25 + 1 + 4 = 5.25
    expected = (2.0 + 5.25) / 6
    assert criterion("--loss", "MSE")(Z, Y).item() == pytest.approx(expected)
    assert criterion()(Z, Y).item() == pytest.approx(expected)  # MSE is the default
    assert criterion()(Z, Y).item() == pytest.approx(nn.MSELoss()(Z, torch.eye(3)[Y]).item())


def test_rescaled_mse_formula():
    # per sample (1/K) [k (z_y - M)^2 + sum_{j != y} z_j^2], with M = 3, k = 2, K = 3, worked by hand:
    # sample 0 (y = 1, z = (1, 2, 0)): (2 (2 - 3)^2 + 1 + 0) / 3 = 1
    # sample 1 (y = 2, z = (0.5, 1, 3)): (2 (3 - 3)^2 + 0.25 + 1) / 3 = 1.25 / 3
    expected = (1 + 1.25 / 3) / 2
    loss = criterion("--loss", "RescaledMSE", "--M", "3", "--k", "2")(Z, Y)
    assert loss.item() == pytest.approx(expected)


def test_rescaled_mse_generic_case_against_a_loop():
    torch.manual_seed(0)
    z, y, M, k, K = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 3, 1, 1, 2]), 5.0, 15.0, 4
    per_sample = []
    for zi, yi in zip(z, y):
        rest = sum(zi[j].item() ** 2 for j in range(K) if j != yi)
        per_sample.append((k * (zi[yi].item() - M) ** 2 + rest) / K)
    loss = criterion("--loss", "RescaledMSE", "--M", str(M), "--k", str(k), num_classes=K)(z, y)
    assert loss.item() == pytest.approx(sum(per_sample) / len(per_sample), rel=1e-12)


def authors_rescaled_mse(z, y, M, k, K):
    """The authors' arithmetic: k (z_y - M)^2 on the true class and z_j^2 elsewhere, the mean over the
    K outputs, then the mean over the batch."""
    onehot = torch.nn.functional.one_hot(y, K).float()
    weight = 1 + (k - 1) * onehot
    return torch.mean(torch.mean(weight * (z - M * onehot) ** 2, 1))


@pytest.mark.parametrize("B, K", [(50, 10), (100, 10), (80, 100), (37, 100)])
@pytest.mark.parametrize("M, k", [(1, 1), (3, 5)])
def test_rescaled_mse_and_its_gradient_are_bitwise_the_authors(B, K, M, k):
    """Batch sizes that are not powers of two (80 at K = 100 is the last batch of a mini-ImageNet epoch):
    there the authors' mean over K, then over B, scales each logit's gradient by fl(fl(1/B)/K), and a sum
    over K, a mean over B and a division by K by another rounding. Bit for bit holds on every CPU:
    each per-output term is one correctly rounded elementwise op after another (with an integer k,
    weight is exactly k or 1), and the two means are the same reductions over the same shapes in the
    same order on both sides."""
    g = torch.Generator().manual_seed(B + K)
    z, y = torch.randn(B, K, generator=g), torch.randint(0, K, (B,), generator=g)
    ours, theirs = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    loss = criterion("--loss", "RescaledMSE", "--M", str(M), "--k", str(k), num_classes=K)(ours, y)
    expected = authors_rescaled_mse(theirs, y, M, k, K)
    loss.backward()
    expected.backward()
    assert torch.equal(loss, expected)
    assert torch.equal(ours.grad, theirs.grad)


@pytest.mark.parametrize("B, K", [(50, 10), (100, 10), (80, 100)])
def test_the_other_order_of_rescaled_mse_gives_other_gradients(B, K):
    """Why the order above matters: a sum over K, a mean over B and a division by K (this repository's
    order before) scale the gradient by fl(fl(1/K)/B), which is not fl(fl(1/B)/K) at these sizes.
    Each scale is elementwise, correctly rounded arithmetic on the same numbers, so this holds on
    every CPU."""
    g = torch.Generator().manual_seed(B + K)
    z, y = torch.randn(B, K, generator=g), torch.randint(0, K, (B,), generator=g)
    ours, other = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    authors_rescaled_mse(ours, y, 1, 1, K).backward()
    ((other - torch.nn.functional.one_hot(y, K).float()) ** 2).sum(1).mean().div(K).backward()
    assert not torch.equal(ours.grad, other.grad)


def test_rescaled_mse_with_M_1_k_1_is_mse():
    assert criterion("--loss", "RescaledMSE")(Z, Y).item() == pytest.approx(criterion("--loss", "MSE")(Z, Y).item())


def test_cross_entropy_formula():
    expected = 0.0
    for z, y in zip(Z.tolist(), Y.tolist()):
        expected += -(z[y] - math.log(sum(math.exp(v) for v in z)))
    # float32 log-softmax: at worst the log-sum-exp (3.1) is rounded (half an ulp, 1.2e-7) before z_y is
    # subtracted; halved in the mean (0.25): 2.4e-7 relative, and exp and log (an ulp or two of terms
    # below 0.1, SIMD or scalar) add less. 1e-6 is 4x that.
    assert criterion("--loss", "CrossEntropy")(Z, Y).item() == pytest.approx(expected / 2, rel=1e-6)


def test_losses_have_gradients():
    for flags in (["--loss", "MSE"], ["--loss", "RescaledMSE", "--M", "3", "--k", "2"], ["--loss", "CrossEntropy"]):
        z = Z.clone().requires_grad_(True)
        criterion(*flags)(z, Y).backward()
        assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_mse_gradient_formula():
    z = Z.clone().requires_grad_(True)
    criterion("--loss", "MSE")(z, Y).backward()
    torch.testing.assert_close(z.grad, 2 * (Z - torch.eye(3)[Y]) / 6)


def test_unknown_loss_is_a_user_error():
    args = train_parser().parse_args([])
    args.loss = "Hinge"
    with pytest.raises(base.UserError, match="Hinge"):
        utils.make_criterion(args, 3)


# ---------------------------------------------------------------------------- penalties

@pytest.mark.parametrize("bias", [True, False])
def test_sep_decay_penalty_formula(bias):
    torch.manual_seed(0)
    model = models.MLP(hidden=4, depth=1, fc_bias=bias, num_classes=3)
    with torch.no_grad():
        model.fc.weight.copy_(torch.arange(12.0).view(3, 4) / 10)
        if bias:
            model.fc.bias.copy_(torch.tensor([1.0, -2.0, 0.5]))
    h = torch.tensor([[1.0, 0.0, 2.0, -1.0], [0.5, 0.5, 0.5, 0.5]])
    wd, fdr = 5e-4, 1e-2
    W2 = sum((i / 10) ** 2 for i in range(12))
    b2 = (1 + 4 + 0.25) if bias else 0.0
    h2 = (1 + 4 + 1) + 4 * 0.25  # sum over the batch of ||h_i||^2
    expected = wd / 2 * (W2 + b2) + fdr / 2 * h2
    # float32 sums of <= 12 squares of exact values: a few u
    assert losses.sep_decay_penalty(model, h, wd, fdr).item() == pytest.approx(expected, rel=1e-6)


def test_sep_decay_penalty_excludes_the_body():
    """Only W, b and the features are decayed: the body's weights get no gradient from the penalty."""
    model = models.MLP(hidden=4, depth=1, num_classes=3)
    h = torch.randn(2, 4, requires_grad=True)
    losses.sep_decay_penalty(model, h, 0.1, 0.2).backward()
    torch.testing.assert_close(h.grad, 0.2 * h.detach())
    torch.testing.assert_close(model.fc.weight.grad, 0.1 * model.fc.weight.detach())
    assert all(p.grad is None for name, p in model.named_parameters() if not name.startswith("fc."))


def test_sep_decay_objective_adds_the_penalty():
    from nclib.training import make_objective
    torch.manual_seed(0)
    args = train_parser().parse_args(["--model", "MLP", "--width", "8", "--depth", "1", "--sep_decay",
                                      "--weight_decay", "0.01", "--feature_decay_rate", "0.02"])
    model = models.build_model(args, 3).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    loss, logits = make_objective(args, model, utils.make_criterion(args, 3))(x, y)
    z, h = model(x)
    expected = nn.MSELoss()(z, torch.eye(3)[y]) + 0.005 * (model.fc.weight.pow(2).sum() + model.fc.bias.pow(2).sum()) \
        + 0.01 * h.pow(2).sum()
    # the same forward pass (same kernels, same shapes); the MSE and penalties summed in another order, 30
    # to 40 float32 terms: ~sqrt(40) u = 4e-7 of their magnitudes, which here do not cancel
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(logits, z)


def test_lbfgs_penalty_formula():
    params = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0], [-1.0]])]
    loss = torch.tensor(0.25)
    assert losses.lbfgs_penalty(loss, params, 0.1).item() == pytest.approx(0.25 + 0.5 * 0.1 * (1 + 4 + 9 + 1))
    assert losses.lbfgs_penalty(loss, params, 0.0).item() == 0.25


def test_make_criterion_takes_the_authors_one_argument_call():
    args = train_parser().parse_args(["--loss", "RescaledMSE", "--M", "3", "--k", "2"])
    args.num_classes = 4
    criterion = utils.make_criterion(args)  # as the authors' scripts call it
    assert isinstance(criterion, losses.RescaledMSELoss) and (criterion.num_classes, criterion.M, criterion.k) == (4, 3, 2)
    assert isinstance(utils.make_criterion(train_parser().parse_args([]), 5), losses.MSELoss)


# ---------------------------------------------------------------------------- a loss registered in one place

def test_a_registered_loss_trains_through_both_training_scripts(dummy_loss, tmp_path):
    import json
    import train_1st_order
    import train_2nd_order
    from conftest import DummyL1Loss, tiny_run
    for main, uid in ((train_1st_order.main, "first"), (train_2nd_order.main, "second")):
        before = DummyL1Loss.forwards
        main(tiny_run(loss="Dummy", save_dir=tmp_path, uid=uid))
        assert DummyL1Loss.forwards > before, uid  # its module made the steps' losses
        with open(tmp_path / uid / "args.json") as f:
            assert json.load(f)["loss"] == "Dummy"
        assert (tmp_path / uid / "epoch_002.pth").exists()
    assert "Dummy" in losses.LOSSES and losses.get("Dummy") is dummy_loss


def test_a_registered_loss_is_gone_after_its_test():
    assert "Dummy" not in losses.LOSSES
