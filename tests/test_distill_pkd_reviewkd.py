"""Tests of the two comparison feature terms of SPEC 6.1: PKD (models/distill/pkd.py) and
ReviewKD (models/distill/reviewkd.py: ABF fusion, HCL loss).

Expected values come from the formulas of SPEC 6.1, written here with explicit loops in plain
Python / numpy (float64) or computed by hand, never with the helpers under test.
"""

from __future__ import annotations

import io
import math
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs import load_config
from models.distill.base import ALL_FPN_LEVELS, FPN_LEVELS, TeacherOutputs
from models.distill.pkd import PKDTerm, pkd_loss
from models.distill.registry import TERMS
from models.distill.reviewkd import ABF, ReviewKDTerm, hcl_loss
from tests.helpers import one_torch_thread  # noqa: F401  (autouse: one intra-op thread)

# FPN level sizes of a tiny batch (strides 4..32 of a 32 x 48 image, then the pooled level)
LEVEL_SIZES = {"0": (8, 12), "1": (4, 6), "2": (2, 3), "3": (1, 2), "pool": (1, 1)}


def fake_batch(channels_s, channels_t, n=2, seed=0, dtype=torch.float32, requires_grad=False):
    """A fake student TrainRecord (features + images) and the matching TeacherOutputs."""
    g = torch.Generator().manual_seed(seed)
    feats_s, feats_t = OrderedDict(), OrderedDict()
    for level, (h, w) in LEVEL_SIZES.items():
        feats_s[level] = (torch.randn(n, channels_s, h, w, generator=g) * 2 + 0.5).to(dtype)
        feats_t[level] = (torch.randn(n, channels_t, h, w, generator=g) * 3 - 1).to(dtype)
        feats_s[level].requires_grad_(requires_grad)
    student = SimpleNamespace(features=feats_s, images=SimpleNamespace(tensors=torch.zeros(n, 3, 32, 48, dtype=dtype)))
    return student, TeacherOutputs({"features": feats_t})


def nonzero_grads(module):
    """Names of the parameters whose gradient is missing or exactly zero."""
    return [name for name, p in module.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]


# ----------------------------------------------------------------------------------------------
# pkd_loss
# ----------------------------------------------------------------------------------------------


def ref_pkd(fs, ft):
    """PKD of one level from the formula, one channel and one value at a time (float64)."""
    n, c, h, w = fs.shape
    total = 0.0
    for ch in range(c):
        cols = []
        for f in (fs, ft):
            vals = [float(f[i, ch, y, x]) for i in range(n) for y in range(h) for x in range(w)]
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
            cols.append([(v - mean) / (std + 1e-6) for v in vals])
        total += sum((a - b) ** 2 for a, b in zip(*cols))
    return total / (n * c * h * w) / 2


def test_pkd_loss_matches_reference():
    rng = np.random.default_rng(1)
    # channels on very different scales and offsets: standardisation per channel must remove them
    scale = np.array([0.1, 1.0, 25.0])[None, :, None, None]
    fs = rng.normal(size=(2, 3, 5, 7)) * scale + 3.0
    ft = rng.normal(size=(2, 3, 5, 7)) * scale[:, ::-1] - 2.0
    got = pkd_loss(torch.from_numpy(fs), torch.from_numpy(ft))
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(ref_pkd(fs, ft), rel=1e-12)


def test_pkd_loss_hand_computed():
    # channel 0: [1, 2, 3] -> mean 2, unbiased std 1 -> [-1, 0, 1] / (1 + 1e-6); teacher reversed.
    # channel 1: [0, 2, 4] vs 10 x [0, 2, 4] + 7: identical after standardisation (0 loss).
    # sum of squares = (2^2 + 0 + 2^2) / (1 + 1e-6)^2 over 6 entries, halved.
    fs = torch.tensor([[[[1.0, 2.0, 3.0]], [[0.0, 2.0, 4.0]]]], dtype=torch.float64)
    ft = torch.tensor([[[[3.0, 2.0, 1.0]], [[7.0, 27.0, 47.0]]]], dtype=torch.float64)
    expected = 8.0 / (1 + 1e-6) ** 2 / 6 / 2
    assert pkd_loss(fs, ft).item() == pytest.approx(expected, rel=1e-12)
    # [0, 2] vs [2, 0]: mean 1, unbiased std sqrt(2): values +-1/(sqrt 2 + 1e-6), diff 2/(...)
    a = torch.tensor([[[[0.0, 2.0]]]], dtype=torch.float64)
    assert pkd_loss(a, a.flip(-1)).item() == pytest.approx(2.0 / (math.sqrt(2) + 1e-6) ** 2, rel=1e-12)
    # invariance to a positive affine map of the teacher
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    assert pkd_loss(x, 5 * x + 3).item() < 1e-10


def test_pkd_loss_detaches_teacher_and_checks_shapes():
    fs = torch.randn(2, 3, 4, 4, requires_grad=True)
    ft = torch.randn(2, 3, 4, 4, requires_grad=True)
    pkd_loss(fs, ft).backward()
    assert fs.grad is not None and fs.grad.abs().sum() > 0
    assert ft.grad is None
    with pytest.raises(ValueError):
        pkd_loss(fs, ft[:, :2])
    with pytest.raises(ValueError):  # a single value per channel: the unbiased std is undefined
        pkd_loss(torch.randn(1, 3, 1, 1), torch.randn(1, 3, 1, 1))


# ----------------------------------------------------------------------------------------------
# hcl_loss
# ----------------------------------------------------------------------------------------------


def ref_adaptive_avg_pool(f, size):
    """Adaptive average pool from its definition: bin i of n covers [floor(i*H/l), ceil((i+1)*H/l))."""
    n, c, h, w = f.shape
    out = np.zeros((n, c, size, size))
    for i in range(size):
        y0, y1 = (i * h) // size, -((-(i + 1) * h) // size)
        for j in range(size):
            x0, x1 = (j * w) // size, -((-(j + 1) * w) // size)
            for a in range(n):
                for b in range(c):
                    cells = [f[a, b, y, x] for y in range(y0, y1) for x in range(x0, x1)]
                    out[a, b, i, j] = sum(cells) / len(cells)
    return out


def ref_mse(a, b):
    return float(np.mean((np.asarray(a) - np.asarray(b)) ** 2))


def ref_hcl(feats_s, feats_t):
    total = 0.0
    for fs, ft in zip(feats_s, feats_t):
        h = fs.shape[2]
        used = [l for l in (4, 2, 1) if l < h]
        weights = [0.5, 0.25, 0.125][:len(used)]
        level = ref_mse(fs, ft)
        for l, w in zip(used, weights):
            level += w * ref_mse(ref_adaptive_avg_pool(fs, l), ref_adaptive_avg_pool(ft, l))
        total += level / (1 + sum(weights))
    return total


def test_hcl_loss_matches_reference():
    rng = np.random.default_rng(2)
    # heights 1, 2, 3, 5, 8 use 0, 1, 2, 3 and 3 pools; widths not equal to the heights
    shapes = [(2, 3, 1, 2), (2, 3, 2, 3), (2, 3, 3, 5), (2, 3, 5, 7), (2, 3, 8, 6)]
    fs = [rng.normal(size=s) for s in shapes]
    ft = [rng.normal(size=s) * 2 + 1 for s in shapes]
    got = hcl_loss([torch.from_numpy(a) for a in fs], [torch.from_numpy(a) for a in ft])
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(ref_hcl(fs, ft), rel=1e-12)
    # and level by level (each level's pools and weights on their own)
    for a, b in zip(fs, ft):
        assert hcl_loss([torch.from_numpy(a)], [torch.from_numpy(b)]).item() == pytest.approx(
            ref_hcl([a], [b]), rel=1e-12)


def test_hcl_loss_hand_computed():
    # height 2: only l = 1 is used, with weight 0.5, and the level is divided by 1.5.
    # mse(0, [[1,2],[3,4]]) = 30/4 = 7.5; pooled: (0 - 2.5)^2 = 6.25 -> (7.5 + 3.125) / 1.5
    s2 = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    t2 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], dtype=torch.float64)
    assert hcl_loss([s2], [t2]).item() == pytest.approx((7.5 + 0.5 * 6.25) / 1.5, rel=1e-12)
    # height 1: no pool at all, plain mse = (1 + 4 + 9) / 3
    s1 = torch.zeros(1, 1, 1, 3, dtype=torch.float64)
    t1 = torch.tensor([[[[1.0, 2.0, 3.0]]]], dtype=torch.float64)
    assert hcl_loss([s1], [t1]).item() == pytest.approx(14 / 3, rel=1e-12)
    # height 4: l = 2 (weight 0.5) and l = 1 (0.25), l = 4 skipped; a constant offset of 1 gives
    # mse 1 at every scale -> (1 + 0.5 + 0.25) / 1.75 = 1; summed over levels
    s4 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    got = hcl_loss([s2, s1, s4], [t2, t1, s4 + 1])
    assert got.item() == pytest.approx((7.5 + 3.125) / 1.5 + 14 / 3 + 1.0, rel=1e-12)


def test_hcl_loss_detaches_teacher_and_checks_shapes():
    fs = [torch.randn(2, 3, 5, 5, requires_grad=True)]
    ft = [torch.randn(2, 3, 5, 5, requires_grad=True)]
    hcl_loss(fs, ft).backward()
    assert fs[0].grad.abs().sum() > 0 and ft[0].grad is None
    with pytest.raises(ValueError):
        hcl_loss(fs, [torch.randn(2, 3, 4, 5)])
    with pytest.raises(ValueError):
        hcl_loss(fs, ft + ft)


# ----------------------------------------------------------------------------------------------
# ABF
# ----------------------------------------------------------------------------------------------


def identity_bn(bn):
    bn.eval()
    bn.eps = 0.0
    with torch.no_grad():
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        bn.weight.fill_(1.0)
        bn.bias.zero_()


def test_abf_hand_set_weights_fusion_order_and_nearest_resize():
    abf = ABF(1, 1, 1, fuse=True)
    identity_bn(abf.conv1[1])
    identity_bn(abf.conv2[1])
    with torch.no_grad():
        abf.conv1[0].weight.fill_(2.0)  # x' = 2 x
        abf.conv2[0].weight.zero_()
        abf.conv2[0].weight[0, 0, 1, 1] = 1.0  # out = x' (3x3 identity)
        # z0 = sigmoid(0.3 x' - 0.2 y + 0.1), z1 = sigmoid(-0.4 x' + 0.5 y - 0.2):
        # distinct weights, so swapping the concat order or z's channels would change the result
        abf.att_conv[0].weight.copy_(torch.tensor([[0.3, -0.2], [-0.4, 0.5]]).reshape(2, 2, 1, 1))
        abf.att_conv[0].bias.copy_(torch.tensor([0.1, -0.2]))
    x = torch.randn(2, 1, 5, 7, dtype=torch.float32)
    y = torch.randn(2, 1, 2, 3, dtype=torch.float32)
    out, fused = abf(x, y)

    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expected = np.zeros((2, 1, 5, 7))
    for n in range(2):
        for i in range(5):
            for j in range(7):
                xv = 2 * float(x[n, 0, i, j])
                yv = float(y[n, 0, (i * 2) // 5, (j * 3) // 7])  # nearest: floor(i * in / out)
                z0, z1 = sig(0.3 * xv - 0.2 * yv + 0.1), sig(-0.4 * xv + 0.5 * yv - 0.2)
                expected[n, 0, i, j] = xv * z0 + yv * z1
    assert np.allclose(fused.detach().numpy(), expected, atol=1e-6)
    assert np.allclose(out.detach().numpy(), expected, atol=1e-6)


def test_abf_matches_independent_recomputation():
    torch.manual_seed(3)
    abf = ABF(3, 4, 5, fuse=True)
    with torch.no_grad():  # non-trivial BN state and affine parameters
        for bn in (abf.conv1[1], abf.conv2[1]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
            bn.bias.normal_()
    abf.eval()
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    y = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    out, fused = abf.double()(x, y)

    def bn(t, m):
        return ((t - m.running_mean[None, :, None, None]) / torch.sqrt(m.running_var[None, :, None, None] + m.eps)
                * m.weight[None, :, None, None] + m.bias[None, :, None, None])

    w1 = abf.conv1[0].weight[:, :, 0, 0]
    xp = bn(torch.einsum("oi,nihw->nohw", w1, x), abf.conv1[1])
    rows = torch.tensor([(i * 3) // 6 for i in range(6)])
    cols = torch.tensor([(j * 3) // 5 for j in range(5)])
    yr = y[:, :, rows][:, :, :, cols]
    wa, ba = abf.att_conv[0].weight[:, :, 0, 0], abf.att_conv[0].bias
    z = torch.sigmoid(torch.einsum("oi,nihw->nohw", wa[:, :4], xp) + torch.einsum("oi,nihw->nohw", wa[:, 4:], yr)
                      + ba[None, :, None, None])
    xf = xp * z[:, :1] + yr * z[:, 1:]
    # 3x3 conv with zero padding 1, one tap at a time
    w2 = abf.conv2[0].weight
    pad = F.pad(xf, (1, 1, 1, 1))
    conv = sum(torch.einsum("oi,nihw->nohw", w2[:, :, dy, dx], pad[:, :, dy:dy + 6, dx:dx + 5])
               for dy in range(3) for dx in range(3))
    assert torch.allclose(fused, xf, atol=1e-12)
    assert torch.allclose(out, bn(conv, abf.conv2[1]), atol=1e-12)


def test_abf_initialisation_and_coarsest_level():
    torch.manual_seed(0)
    abf = ABF(64, 32, 48, fuse=True)
    for conv, fan_in in ((abf.conv1[0], 64), (abf.conv2[0], 32 * 9)):
        w = conv.weight.detach()
        bound = math.sqrt(6 / ((1 + 1 ** 2) * fan_in))  # kaiming_uniform_, a = 1
        assert w.abs().max() <= bound
        # beyond PyTorch's default bound 1/sqrt(fan_in) (a = sqrt 5): the init was really applied
        assert w.abs().max() > 1.5 / math.sqrt(fan_in)
        assert w.std() == pytest.approx(bound / math.sqrt(3), rel=0.1)
        assert conv.bias is None
    # the coarsest level has no attention conv and takes no residual
    coarse = ABF(8, 8, 8, fuse=False)
    assert coarse.att_conv is None
    assert not any("att_conv" in k for k in coarse.state_dict())
    with pytest.raises(ValueError):
        coarse(torch.randn(1, 8, 2, 2), torch.randn(1, 8, 1, 1))
    with pytest.raises(ValueError):
        abf(torch.randn(1, 64, 2, 2))


# ----------------------------------------------------------------------------------------------
# PKDTerm
# ----------------------------------------------------------------------------------------------


def test_pkd_term_from_config_weight_names_and_levels():
    assert TERMS["pkd"] is PKDTerm and PKDTerm.needs == {"features"}
    cfg = load_config(None, ["PKD.WEIGHT", "3.0"])
    term = PKDTerm.from_config(cfg, 4, 4)
    assert term.weight == 3.0 and term.align is None
    assert term.checkpoint_state() == {}  # nothing to save without an align conv
    student, teacher = fake_batch(4, 4)
    student.features["pool"] = torch.full((2, 4, 1, 1), float("nan"))  # the pooled level is not used
    losses = term(student, teacher)
    assert list(losses) == [f"loss_pkd_fpn_layer_{i}" for i in range(4)]
    for i, level in enumerate(FPN_LEVELS):
        expected = 3.0 * pkd_loss(student.features[level], teacher.features[level])
        assert torch.equal(losses[f"loss_pkd_fpn_layer_{i}"], expected)
    assert PKDTerm.from_config(load_config(None, []), 4, 4).weight == 6.0


def test_pkd_term_align_conv_when_widths_differ():
    torch.manual_seed(0)
    term = PKDTerm.from_config(load_config(None, ["PKD.WEIGHT", "2.5"]), 3, 5)
    assert sorted(term.align) == sorted(FPN_LEVELS)
    for conv in term.align.values():
        assert conv.in_channels == 3 and conv.out_channels == 5 and conv.kernel_size == (1, 1)
        assert conv.bias is not None
    assert sorted(term.checkpoint_state()) == sorted(f"align.{lv}.{p}" for lv in FPN_LEVELS for p in ("weight", "bias"))
    student, teacher = fake_batch(3, 5)
    losses = term(student, teacher)
    for i, level in enumerate(FPN_LEVELS):
        aligned = term.align[level](student.features[level])
        assert torch.allclose(losses[f"loss_pkd_fpn_layer_{i}"], 2.5 * pkd_loss(aligned, teacher.features[level]))


def test_pkd_term_gradients_and_sgd_step():
    torch.manual_seed(1)
    term = PKDTerm.from_config(load_config(None, []), 3, 5)
    student, teacher = fake_batch(3, 5, requires_grad=True)
    sum(term(student, teacher).values()).backward()
    for level in FPN_LEVELS:
        conv = term.align[level]
        assert conv.weight.grad.abs().min() > 0
        # the per-channel standardisation removes the bias: its gradient is zero up to round-off
        assert conv.bias.grad.abs().max() < 1e-5 * conv.weight.grad.abs().max()
        assert student.features[level].grad.abs().sum() > 0
    assert student.features["pool"].grad is None
    before = {k: v.clone() for k, v in term.state_dict().items()}
    torch.optim.SGD(term.parameters(), lr=0.1).step()
    for level in FPN_LEVELS:
        assert (term.align[level].weight != before[f"align.{level}.weight"]).all()


def test_pkd_term_checkpoint_round_trip():
    torch.manual_seed(2)
    cfg = load_config(None, [])
    term = PKDTerm.from_config(cfg, 3, 5)
    with torch.no_grad():
        for p in term.parameters():
            p.add_(0.1)
    buf = io.BytesIO()
    torch.save(term.checkpoint_state(), buf)
    fresh = PKDTerm.from_config(cfg, 3, 5)
    fresh.load_checkpoint_state(torch.load(io.BytesIO(buf.getvalue())))
    student, teacher = fake_batch(3, 5, seed=4)
    a, b = term(student, teacher), fresh(student, teacher)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# ReviewKDTerm
# ----------------------------------------------------------------------------------------------


def test_reviewkd_term_from_config_weight_name_and_layout():
    assert TERMS["reviewkd"] is ReviewKDTerm and ReviewKDTerm.needs == {"features"}
    assert ReviewKDTerm(4, 4).state_key == "reviewkd"
    torch.manual_seed(0)
    term = ReviewKDTerm.from_config(load_config(None, ["REVIEWKD.WEIGHT", "0.7"]), 3, 4)
    assert term.weight == 0.7
    assert sorted(term.abfs) == sorted(ALL_FPN_LEVELS)
    assert term.abfs["pool"].att_conv is None
    assert all(term.abfs[lv].att_conv is not None for lv in FPN_LEVELS)
    for abf in term.abfs.values():
        assert abf.conv1[0].in_channels == 3 and abf.conv2[0].out_channels == 4
    keys = set(term.checkpoint_state())
    assert "abfs.pool.conv1.1.running_mean" in keys and "abfs.0.att_conv.0.weight" in keys
    assert all(k.startswith("abfs.") for k in keys)

    term.eval()
    student, teacher = fake_batch(3, 4)
    losses = term(student, teacher)
    assert list(losses) == ["loss_reviewkd"]
    # the same, recomputed: ABFs from 'pool' to '0', each fed the coarser level's x'
    outs, residual = {}, None
    for level in ("pool", "3", "2", "1", "0"):
        outs[level], residual = term.abfs[level](student.features[level], residual)
    expected = 0.7 * hcl_loss([outs[lv] for lv in ALL_FPN_LEVELS], [teacher.features[lv] for lv in ALL_FPN_LEVELS])
    assert torch.equal(losses["loss_reviewkd"], expected)
    assert ReviewKDTerm.from_config(load_config(None, []), 3, 4).weight == 1.2


def test_reviewkd_term_every_part_is_trained():
    torch.manual_seed(1)
    term = ReviewKDTerm.from_config(load_config(None, []), 3, 4).train()
    student, teacher = fake_batch(3, 4, requires_grad=True)
    term(student, teacher)["loss_reviewkd"].backward()
    assert nonzero_grads(term) == []
    names = [n for n, _ in term.named_parameters()]
    for level in ALL_FPN_LEVELS:  # every conv and BN affine of every ABF is a parameter
        for part in ("conv1.0.weight", "conv1.1.weight", "conv1.1.bias", "conv2.0.weight",
                     "conv2.1.weight", "conv2.1.bias"):
            assert f"abfs.{level}.{part}" in names
    assert sum("att_conv.0" in n for n in names) == 2 * len(FPN_LEVELS)
    assert all(student.features[lv].grad.abs().sum() > 0 for lv in ALL_FPN_LEVELS)
    before = {n: p.detach().clone() for n, p in term.named_parameters()}
    torch.optim.SGD(term.parameters(), lr=0.1).step()
    unchanged = [n for n, p in term.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []

    # the finest output alone reaches every coarser level through the fused residuals x'
    term.zero_grad()
    out = term.review(student.features)["0"]
    hcl_loss([out], [teacher.features["0"]]).backward()
    for level in ALL_FPN_LEVELS:
        assert nonzero_grads(term.abfs[level].conv1) == [], level


def test_reviewkd_term_checkpoint_round_trip_with_bn_statistics():
    cfg = load_config(None, [])
    torch.manual_seed(2)
    term = ReviewKDTerm.from_config(cfg, 3, 4).train()
    for seed in range(3):  # move the BN running statistics away from their initial values
        with torch.no_grad():
            term(*fake_batch(3, 4, seed=seed))
    assert not torch.equal(term.abfs["0"].conv2[1].running_mean, torch.zeros(4))
    buf = io.BytesIO()
    torch.save(term.checkpoint_state(), buf)
    torch.manual_seed(99)
    fresh = ReviewKDTerm.from_config(cfg, 3, 4)
    student, teacher = fake_batch(3, 4, seed=7)
    before = fresh.eval()(student, teacher)["loss_reviewkd"]
    assert not torch.equal(before, term.eval()(student, teacher)["loss_reviewkd"])
    fresh.load_checkpoint_state(torch.load(io.BytesIO(buf.getvalue())))
    for module in (term, fresh):
        module.eval()  # eval: the outputs depend on the running statistics
    assert torch.equal(term(student, teacher)["loss_reviewkd"], fresh(student, teacher)["loss_reviewkd"])
    assert torch.equal(term.review(student.features)["0"], fresh.review(student.features)["0"])
    for k, v in term.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


# ----------------------------------------------------------------------------------------------
# AMP
# ----------------------------------------------------------------------------------------------


def test_losses_are_float32_under_bf16_autocast():
    torch.manual_seed(3)
    cfg = load_config(None, [])
    pkd, review = PKDTerm.from_config(cfg, 3, 4), ReviewKDTerm.from_config(cfg, 3, 4)
    student, teacher = fake_batch(3, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = {**pkd(student, teacher), **review(student, teacher)}
        direct = [pkd_loss(student.features["0"], teacher.features["0"][:, :3]),
                  hcl_loss([student.features["0"]], [teacher.features["0"][:, :3]])]
    for loss in list(losses.values()) + direct:
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # the float32 result of bf16 inputs is that of the same inputs in float32
    f32 = pkd_loss(student.features["0"].float(), teacher.features["0"][:, :3].float())
    assert torch.allclose(direct[0], f32, rtol=1e-6)


def test_terms_run_in_float32_under_autocast():
    # autocast is off inside the terms (align conv, ABFs and loss in float32): the losses under
    # bf16 autocast are exactly those of the same bf16 maps computed without autocast
    torch.manual_seed(4)
    cfg = load_config(None, [])
    for term in (PKDTerm.from_config(cfg, 3, 4), ReviewKDTerm.from_config(cfg, 3, 4).eval()):
        student, teacher = fake_batch(3, 4, dtype=torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = term(student, teacher)
        plain = term(student, teacher)
        assert all(torch.equal(under[k], plain[k]) for k in plain), type(term).__name__
