"""Tests of the CWD and MGD distillation terms (models/distill/cwd.py, models/distill/mgd.py).

Expected values come from the formulas (explicit loops in float64, hand computations, or the
generation block re-applied with torch.nn.functional.conv2d and the module's own weights), never
from the helpers under test.
"""

import io
import math
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs import load_config
from models.distill.base import ALL_FPN_LEVELS, TeacherOutputs
from models.distill.cwd import CWDTerm, cwd_loss
from models.distill.mgd import MGDTerm, mgd_loss, random_spatial_mask
from models.distill.registry import TERMS, build_terms

# spatial sizes of the fake FPN levels (all > 1 position, so every level carries a gradient)
SIZES = {"0": (8, 10), "1": (4, 5), "2": (3, 3), "3": (2, 3), "pool": (2, 2)}


def fake_batch(student_channels=6, teacher_channels=8, n=2, seed=0, dtype=torch.float32,
               requires_grad=False):
    """A fake TrainRecord (only what the terms read) and the matching TeacherOutputs."""
    g = torch.Generator().manual_seed(seed)
    fs, ft = OrderedDict(), OrderedDict()
    for level, (h, w) in SIZES.items():
        fs[level] = (torch.randn(n, student_channels, h, w, generator=g) * 2.0).to(dtype)
        ft[level] = (torch.randn(n, teacher_channels, h, w, generator=g) * 2.0 + 0.5).to(dtype)
        fs[level].requires_grad_(requires_grad)
    record = SimpleNamespace(features=fs, images=SimpleNamespace(tensors=torch.zeros(n, 3, 32, 40)))
    return record, TeacherOutputs({"features": ft})


# ----------------------------------------------------------------------------------------------
# CWD: the loss of one level
# ----------------------------------------------------------------------------------------------


def ref_cwd(feat_s, feat_t, tau):
    """tau^2 / (N C) * sum_{n,c} KL(p_t || p_s), softmax over positions, plain Python floats."""
    s = np.asarray(feat_s, dtype=np.float64)
    t = np.asarray(feat_t, dtype=np.float64)
    n, c, h, w = s.shape
    total = 0.0
    for i in range(n):
        for j in range(c):
            zs = [s[i, j, y, x] / tau for y in range(h) for x in range(w)]
            zt = [t[i, j, y, x] / tau for y in range(h) for x in range(w)]
            ms, mt = max(zs), max(zt)
            log_zs = math.log(sum(math.exp(v - ms) for v in zs)) + ms
            log_zt = math.log(sum(math.exp(v - mt) for v in zt)) + mt
            for a, b in zip(zs, zt):
                log_ps, log_pt = a - log_zs, b - log_zt
                total += math.exp(log_pt) * (log_pt - log_ps)
    return tau ** 2 * total / (n * c)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 1, 7, 2), (1, 4, 1, 6)])
@pytest.mark.parametrize("tau", [1.0, 0.5, 4.0])
def test_cwd_loss_matches_loop_reference(shape, tau):
    g = torch.Generator().manual_seed(sum(shape) * 10 + int(tau * 10))
    s = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    t = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    expected = ref_cwd(s.numpy(), t.numpy(), tau)
    assert expected > 1e-3  # the case is not trivially zero
    got64 = cwd_loss(s, t, tau)
    assert got64.dtype == torch.float64
    assert got64.item() == pytest.approx(expected, rel=1e-10)
    got32 = cwd_loss(s.float(), t.float(), tau)
    assert got32.dtype == torch.float32
    assert got32.item() == pytest.approx(expected, rel=1e-5)


def test_cwd_loss_hand_computed():
    # one channel of two positions: teacher logits [0, ln 3] -> p_t = [1/4, 3/4], student [0, 0]
    # -> p_s = [1/2, 1/2]; KL = 1/4 ln(1/2) + 3/4 ln(3/2)
    s = torch.tensor([[[[0.0, 0.0]]]], dtype=torch.float64)
    t = torch.tensor([[[[0.0, math.log(3.0)]]]], dtype=torch.float64)
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert cwd_loss(s, t, 1.0).item() == pytest.approx(kl, rel=1e-12)
    # tau^2 factor: scaling both maps and tau by 2 leaves the distributions, multiplies by 4
    assert cwd_loss(2 * s, 2 * t, 2.0).item() == pytest.approx(4 * kl, rel=1e-12)
    # tau = 2 on the same maps: p_t = softmax([0, ln(3)/2]) = [1, sqrt 3] / (1 + sqrt 3)
    r3 = math.sqrt(3.0)
    pt = [1 / (1 + r3), r3 / (1 + r3)]
    kl2 = sum(p * math.log(p / 0.5) for p in pt)
    assert cwd_loss(s, t, 2.0).item() == pytest.approx(4 * kl2, rel=1e-12)
    # the mean is over N * C: the channel appended twice (batch of 2, 3 channels) changes nothing
    s6, t6 = s.expand(2, 3, 1, 2).contiguous(), t.expand(2, 3, 1, 2).contiguous()
    assert cwd_loss(s6, t6, 1.0).item() == pytest.approx(kl, rel=1e-12)


def test_cwd_loss_zero_invariance_and_gradients():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(2, 3, 4, 4, generator=g)
    assert cwd_loss(t.clone(), t, 1.0).item() == 0.0
    # a constant added to a whole channel does not change its spatial softmax
    s = torch.randn(2, 3, 4, 4, generator=g)
    shifted = s + torch.tensor([5.0, -3.0, 0.25]).view(1, 3, 1, 1)
    assert cwd_loss(shifted, t).item() == pytest.approx(cwd_loss(s, t).item(), rel=1e-5)
    # only the student receives a gradient
    s.requires_grad_(True)
    t.requires_grad_(True)
    cwd_loss(s, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None
    with pytest.raises(ValueError):
        cwd_loss(s, t[:, :2])
    with pytest.raises(ValueError):
        cwd_loss(s, t, tau=0.0)


# ----------------------------------------------------------------------------------------------
# MGD: mask, loss, generation
# ----------------------------------------------------------------------------------------------


def test_random_spatial_mask_fraction_and_shape():
    feat = torch.zeros(4, 3, 250, 250)
    torch.manual_seed(123)
    mask = random_spatial_mask(feat, 0.65)
    assert mask.shape == (4, 1, 250, 250) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    # 250,000 independent positions, each masked with p = 0.65: std of the masked fraction is
    # sqrt(p (1 - p) / n) ~ 9.5e-4; 5 std ~ 4.8e-3
    p, count = 0.65, mask.numel()
    std = math.sqrt(p * (1 - p) / count)
    assert abs((mask == 0).float().mean().item() - p) < 5 * std
    # the run's RNG governs it: the same seed gives the same mask, drawn as torch.rand(N,1,H,W)
    torch.manual_seed(123)
    u = torch.rand(4, 1, 250, 250)
    assert torch.equal(mask, (u < 1 - p).float())
    assert random_spatial_mask(feat.double(), 0.5).dtype == torch.float64


def test_random_spatial_mask_extremes():
    feat = torch.ones(3, 2, 40, 50)
    assert torch.equal(random_spatial_mask(feat, 0.0), torch.ones(3, 1, 40, 50))
    assert torch.equal(random_spatial_mask(feat, 1.0), torch.zeros(3, 1, 40, 50))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError):
            random_spatial_mask(feat, bad)


def test_mgd_loss_hand_computed():
    generated = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]], requires_grad=True)
    teacher = torch.tensor([[[[0.0, 0.0]]], [[[1.0, -1.0]]]], requires_grad=True)
    # (1 + 4 + 1 + 1) / N, N = 2
    loss = mgd_loss(generated, teacher)
    assert loss.item() == pytest.approx(3.5)
    loss.backward()
    assert torch.allclose(generated.grad, (generated - teacher).detach())  # d/dg = 2 (g - t) / 2
    assert teacher.grad is None
    with pytest.raises(ValueError):
        mgd_loss(generated, teacher[:1])


def _generate_by_hand(block, feat_s, mask):
    """G(M * align(F_s)) with F.conv2d and the block's own weights."""
    x = feat_s
    if block.align is not None:
        x = F.conv2d(x, block.align.weight, block.align.bias)
    x = x * mask
    c1, c2 = block.generation[0], block.generation[2]
    x = F.relu(F.conv2d(x, c1.weight, c1.bias, padding=1))
    return F.conv2d(x, c2.weight, c2.bias, padding=1)


@pytest.mark.parametrize("widths", [(6, 8), (8, 8)])
def test_mgd_term_matches_independent_computation(widths):
    cfg = load_config(None, [])
    torch.manual_seed(0)
    term = MGDTerm.from_config(cfg, *widths)
    record, teacher = fake_batch(*widths)
    torch.manual_seed(42)
    losses = term(record, teacher)
    assert list(losses) == [f"loss_mgd_fpn_{lv}" for lv in ALL_FPN_LEVELS]
    torch.manual_seed(42)  # the same masks: drawn level after level, in the config's order
    with torch.no_grad():
        for level in ALL_FPN_LEVELS:
            fs, ft = record.features[level], teacher.features[level]
            n, _, h, w = fs.shape
            mask = (torch.rand(n, 1, h, w) < 1 - 0.65).float()
            gen = _generate_by_hand(term.levels[level], fs, mask)
            expected = 2e-5 * ((gen - ft) ** 2).sum() / n
            assert losses[f"loss_mgd_fpn_{level}"].dtype == torch.float32
            torch.testing.assert_close(losses[f"loss_mgd_fpn_{level}"], expected, rtol=1e-5, atol=0)


def test_mgd_term_zero_generation_weights():
    # a zero generation block outputs 0 whatever the mask: loss = ALPHA * sum(F_t^2) / N
    cfg = load_config(None, [])
    term = MGDTerm.from_config(cfg, 6, 8)
    with torch.no_grad():
        for p in term.parameters():
            p.zero_()
    record, teacher = fake_batch(6, 8, n=3)
    losses = term(record, teacher)
    for level in ALL_FPN_LEVELS:
        ft = teacher.features[level].double()
        expected = 2e-5 * (ft ** 2).sum().item() / 3
        assert losses[f"loss_mgd_fpn_{level}"].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("widths", [(6, 8), (8, 8)])
def test_mgd_term_masks_positions_for_all_channels(widths):
    """The generation block sees align(F_s) with whole positions (all channels) zeroed, on about
    MASK_RATIO of the positions."""
    cfg = load_config(None, ["MGD.LEVELS", "['0']"])
    term = MGDTerm.from_config(cfg, *widths)
    n, h, w = 4, 60, 70
    fs = torch.randn(n, widths[0], h, w) + 3.0  # no exact zeros
    record = SimpleNamespace(features=OrderedDict([("0", fs)]), images=SimpleNamespace(tensors=fs[:, :3]))
    teacher = TeacherOutputs({"features": OrderedDict([("0", torch.randn(n, widths[1], h, w))])})
    seen = []
    block = term.levels["0"]
    hook = block.generation[0].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    torch.manual_seed(7)
    term(record, teacher)
    hook.remove()
    masked = seen[0]
    with torch.no_grad():
        aligned = block.align(fs) if block.align is not None else fs
    assert (aligned != 0).all()
    zero = (masked == 0).all(dim=1)
    kept = (masked == aligned).all(dim=1)
    assert (zero ^ kept).all()  # every position is either fully masked or fully kept
    p, count = 0.65, n * h * w
    assert abs(zero.float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / count)


# ----------------------------------------------------------------------------------------------
# Terms from the config
# ----------------------------------------------------------------------------------------------


def test_terms_registered():
    assert TERMS["cwd"] is CWDTerm and TERMS["mgd"] is MGDTerm
    assert CWDTerm.needs == frozenset({"features"}) == MGDTerm.needs
    cfg = load_config(None, [])
    terms = build_terms(cfg, ["cwd", "mgd"], 6, 8)
    assert [t.state_key for t in terms.values()] == ["cwd", "mgd"]


def test_cwd_term_defaults():
    cfg = load_config(None, [])
    term = CWDTerm.from_config(cfg, 8, 8)
    assert term.levels == ALL_FPN_LEVELS and term.weight == 10.0 and term.tau == 1.0
    assert len(term.state_dict()) == 0  # equal widths: no align conv, nothing to save
    record, teacher = fake_batch(8, 8)
    losses = term(record, teacher)
    assert list(losses) == [f"loss_cwd_fpn_{lv}" for lv in ALL_FPN_LEVELS]
    for level in ALL_FPN_LEVELS:
        expected = 10.0 * ref_cwd(record.features[level].numpy(), teacher.features[level].numpy(), 1.0)
        assert losses[f"loss_cwd_fpn_{level}"].item() == pytest.approx(expected, rel=1e-5)


def test_cwd_term_options_applied():
    cfg = load_config(None, ["CWD.WEIGHT", "3.0", "CWD.TAU", "2.0", "CWD.LEVELS", "['0','pool']"])
    term = CWDTerm.from_config(cfg, 8, 8)
    record, teacher = fake_batch(8, 8)
    losses = term(record, teacher)
    assert list(losses) == ["loss_cwd_fpn_0", "loss_cwd_fpn_pool"]
    for level in ("0", "pool"):
        expected = 3.0 * ref_cwd(record.features[level].numpy(), teacher.features[level].numpy(), 2.0)
        assert losses[f"loss_cwd_fpn_{level}"].item() == pytest.approx(expected, rel=1e-5)
    # different widths: one 1x1 align conv (no bias: the loss is invariant to it) per level
    term = CWDTerm.from_config(cfg, 6, 8)
    assert sorted(term.state_dict()) == ["align.0.weight", "align.pool.weight"]
    assert term.align["0"].weight.shape == (8, 6, 1, 1)
    record, teacher = fake_batch(6, 8)
    losses = term(record, teacher)
    with torch.no_grad():
        aligned = F.conv2d(record.features["pool"], term.align["pool"].weight)
    expected = 3.0 * ref_cwd(aligned.numpy(), teacher.features["pool"].numpy(), 2.0)
    assert losses["loss_cwd_fpn_pool"].item() == pytest.approx(expected, rel=1e-5)


def test_mgd_term_options_applied():
    cfg = load_config(None, ["MGD.ALPHA", "1e-3", "MGD.MASK_RATIO", "0.0", "MGD.LEVELS", "['1','3']"])
    term = MGDTerm.from_config(cfg, 6, 8)
    assert term.alpha == 1e-3 and term.mask_ratio == 0.0
    assert list(term.levels) == ["1", "3"]
    assert sorted(term.state_dict()) == sorted(
        f"levels.{lv}.{part}.{p}" for lv in ("1", "3") for part in ("align", "generation.0", "generation.2")
        for p in ("weight", "bias"))
    assert term.levels["1"].align.weight.shape == (8, 6, 1, 1)
    assert term.levels["1"].generation[0].weight.shape == (8, 8, 3, 3)
    record, teacher = fake_batch(6, 8)
    losses = term(record, teacher)
    assert list(losses) == ["loss_mgd_fpn_1", "loss_mgd_fpn_3"]
    with torch.no_grad():
        for level in ("1", "3"):
            fs, ft = record.features[level], teacher.features[level]
            gen = _generate_by_hand(term.levels[level], fs, torch.ones(1))  # ratio 0: no mask
            expected = 1e-3 * ((gen - ft) ** 2).sum() / fs.shape[0]
            torch.testing.assert_close(losses[f"loss_mgd_fpn_{level}"], expected, rtol=1e-5, atol=0)
    # equal widths: no align conv
    term = MGDTerm.from_config(cfg, 8, 8)
    assert term.levels["1"].align is None
    assert not any("align" in k for k in term.state_dict())


@pytest.mark.parametrize("key", ["CWD.LEVELS", "MGD.LEVELS"])
@pytest.mark.parametrize("levels", ["['0','p5']", "[]", "['1','1']"])
def test_bad_levels_rejected(key, levels):
    cfg = load_config(None, [key, levels])
    cls = CWDTerm if key.startswith("CWD") else MGDTerm
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as err:
        cls.from_config(cfg, 8, 8)
    assert "pool" in str(err.value)  # the allowed names are listed


def test_bad_mask_ratio_and_tau_rejected():
    with pytest.raises(ValueError, match="MASK_RATIO"):
        MGDTerm.from_config(load_config(None, ["MGD.MASK_RATIO", "1.5"]), 8, 8)
    with pytest.raises(ValueError, match="TAU"):
        CWDTerm.from_config(load_config(None, ["CWD.TAU", "0.0"]), 8, 8)


# ----------------------------------------------------------------------------------------------
# Gradients, checkpoints, autocast
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cwd", "mgd"])
def test_every_parameter_trained(name):
    cfg = load_config(None, ["MGD.ALPHA", "1.0"])  # a weight that makes every step visible
    torch.manual_seed(0)
    term = TERMS[name].from_config(cfg, 6, 8)
    params = dict(term.named_parameters())
    expected = len(ALL_FPN_LEVELS) * (1 if name == "cwd" else 6)  # align (+ 2 convs x weight, bias)
    assert len(params) == expected
    before = {k: p.detach().clone() for k, p in params.items()}
    record, teacher = fake_batch(6, 8, requires_grad=True)
    for ft in teacher.features.values():
        ft.requires_grad_(True)
    sum(term(record, teacher).values()).backward()
    for k, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, k
    for level in ALL_FPN_LEVELS:
        assert record.features[level].grad.abs().sum() > 0
        assert teacher.features[level].grad is None  # the teacher is detached
    torch.optim.SGD(term.parameters(), lr=0.1).step()
    for k, p in params.items():
        assert not torch.equal(p.detach(), before[k]), k


@pytest.mark.parametrize("name", ["cwd", "mgd"])
def test_checkpoint_round_trip(name):
    cfg = load_config(None, [])
    torch.manual_seed(0)
    trained = TERMS[name].from_config(cfg, 6, 8)
    record, teacher = fake_batch(6, 8)
    sum(trained(record, teacher).values()).backward()
    torch.optim.SGD(trained.parameters(), lr=1.0).step()  # a state no fresh term has
    buf = io.BytesIO()
    torch.save(trained.checkpoint_state(), buf)
    buf.seek(0)
    state = torch.load(buf)
    torch.manual_seed(1)
    fresh = TERMS[name].from_config(cfg, 6, 8)
    torch.manual_seed(5)
    want = trained(record, teacher)
    torch.manual_seed(5)
    assert not all(torch.equal(a, b) for a, b in zip(want.values(), fresh(record, teacher).values()))
    fresh.load_checkpoint_state(state)
    torch.manual_seed(5)
    got = fresh(record, teacher)
    assert list(got) == list(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # a checkpoint of other levels does not load
    other = TERMS[name].from_config(load_config(None, [f"{name.upper()}.LEVELS", "['0']"]), 6, 8)
    with pytest.raises(RuntimeError):
        other.load_checkpoint_state(state)


@pytest.mark.parametrize("name", ["cwd", "mgd"])
@pytest.mark.parametrize("widths", [(6, 8), (8, 8)])
def test_bf16_autocast_gives_float32_losses(name, widths):
    cfg = load_config(None, [])
    torch.manual_seed(0)
    term = TERMS[name].from_config(cfg, *widths)
    record, teacher = fake_batch(*widths)
    torch.manual_seed(3)
    plain = term(record, teacher)
    torch.manual_seed(3)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        amp = term(record, teacher)
    for k, v in amp.items():
        assert v.dtype == torch.float32 and torch.isfinite(v), k
        assert torch.equal(v, plain[k]), k  # the losses run with autocast off: same arithmetic
    # bf16 maps (as an autocast student produces them) are promoted to float32
    record16, teacher16 = fake_batch(*widths, dtype=torch.bfloat16)
    torch.manual_seed(3)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        amp16 = term(record16, teacher16)
    for k, v in amp16.items():
        assert v.dtype == torch.float32 and torch.isfinite(v) and v > 0, k
