"""Tests of the three DDPS loss terms (models/distill: LD, CD and its selection, DFD).

Every expected value is computed here from the formulas of SPEC 6 with plain Python math or
explicit loops, never with the helpers of the code under test.
"""

import math

import numpy as np
import pytest
import torch

from models.distill import (
    DFDLoss,
    cd_loss,
    dfd_attention,
    dfd_masks,
    ld_loss,
    oim_scores,
    select_cd_persons,
    tckd_nckd,
)

# ----------------------------------------------------------------------------------------------
# LD (decoupled KD)
# ----------------------------------------------------------------------------------------------


def _softmax(row, temperature):
    e = [math.exp(v / temperature) for v in row]
    s = sum(e)
    return [v / s for v in e]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def ref_dkd(logits_s, logits_t, labels, temperature):
    """(TCKD, NCKD) from the definitions, one sample at a time."""
    n = len(labels)
    tckd = nckd = 0.0
    for zs, zt, y in zip(logits_s, logits_t, labels):
        ps, pt = _softmax(zs, temperature), _softmax(zt, temperature)
        tckd += _kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        qs = [p / (1 - ps[y]) for j, p in enumerate(ps) if j != y]
        qt = [p / (1 - pt[y]) for j, p in enumerate(pt) if j != y]
        nckd += _kl(qt, qs)
    return tckd * temperature ** 2 / n, nckd * temperature ** 2 / n


LS2 = [[1.0, 2.0], [0.5, -0.5], [3.0, 0.0]]
LT2 = [[2.0, 0.5], [0.0, 1.0], [1.0, 1.0]]
Y2 = [0, 1, 1]


def test_ld_literal_value():
    # teacher p = [3/4, 1/4] (logits [ln 3, 0], T = 1), student p = [1/2, 1/2], target 0:
    # KL = 0.75 ln(0.75/0.5) + 0.25 ln(0.25/0.5)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert expected == pytest.approx(0.1308120, abs=1e-6)
    got = ld_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]),
                  torch.tensor([0]), temperature=1.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # T = 2 with logits scaled by 2 gives the same distributions, times T^2 = 4
    got = ld_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[2 * math.log(3.0), 0.0]]),
                  torch.tensor([0]), temperature=2.0)
    assert got.item() == pytest.approx(4 * expected, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_ld_hand_values_two_classes(temperature):
    tckd, nckd = ref_dkd(LS2, LT2, Y2, temperature)
    assert abs(nckd) < 1e-12  # one non-target class: q = [1] for both
    got = ld_loss(torch.tensor(LS2), torch.tensor(LT2), torch.tensor(Y2),
                  temperature=temperature)
    assert got.item() == pytest.approx(1.0 * tckd, rel=1e-5)
    # the default temperature is 4
    if temperature == 4.0:
        assert ld_loss(torch.tensor(LS2), torch.tensor(LT2), torch.tensor(Y2)).item() == \
            pytest.approx(tckd, rel=1e-5)


def test_ld_nckd_zero_for_two_classes():
    torch.manual_seed(0)
    zs, zt = torch.randn(7, 2) * 3, torch.randn(7, 2) * 3
    y = torch.randint(0, 2, (7,))
    t, n = tckd_nckd(zs, zt, y, temperature=4.0)
    assert n.item() == 0.0 and t.item() > 0
    assert ld_loss(zs, zt, y, alpha=1.0, beta=100.0).item() == pytest.approx(
        ld_loss(zs, zt, y, alpha=1.0, beta=0.0).item(), rel=1e-6)
    assert ld_loss(zs, zt, y, alpha=0.0, beta=5.0).item() == 0.0


def test_ld_three_classes_against_reference():
    ls = [[1.0, -0.5, 2.0], [0.3, 0.2, -1.0], [-2.0, 1.5, 0.5]]
    lt = [[0.5, 0.5, 1.0], [2.0, -1.0, 0.0], [0.0, 0.0, 3.0]]
    y = [2, 0, 1]
    for temperature in (1.0, 4.0):
        tckd, nckd = ref_dkd(ls, lt, y, temperature)
        assert nckd > 1e-4
        args = torch.tensor(ls), torch.tensor(lt), torch.tensor(y)
        assert ld_loss(*args, alpha=1.0, beta=0.0, temperature=temperature).item() == \
            pytest.approx(tckd, rel=1e-5)
        assert ld_loss(*args, alpha=0.0, beta=1.0, temperature=temperature).item() == \
            pytest.approx(nckd, rel=1e-5)
        assert ld_loss(*args, alpha=0.7, beta=1.3, temperature=temperature).item() == \
            pytest.approx(0.7 * tckd + 1.3 * nckd, rel=1e-5)
        # defaults alpha 1, beta 0.5
        assert ld_loss(*args, temperature=temperature).item() == \
            pytest.approx(tckd + 0.5 * nckd, rel=1e-5)


def test_ld_alpha_beta_linear():
    torch.manual_seed(1)
    zs, zt = torch.randn(5, 4), torch.randn(5, 4)
    y = torch.randint(0, 4, (5,))
    t = ld_loss(zs, zt, y, alpha=1.0, beta=0.0).item()
    n = ld_loss(zs, zt, y, alpha=0.0, beta=1.0).item()
    assert t > 0 and n > 0
    assert ld_loss(zs, zt, y, alpha=3.0, beta=0.25).item() == pytest.approx(3 * t + 0.25 * n,
                                                                             rel=1e-5)


def test_ld_temperature_effect():
    vals = {}
    for temperature in (0.5, 1.0, 4.0, 10.0):
        got = ld_loss(torch.tensor(LS2), torch.tensor(LT2), torch.tensor(Y2),
                      temperature=temperature).item()
        assert got == pytest.approx(ref_dkd(LS2, LT2, Y2, temperature)[0], rel=1e-5)
        vals[temperature] = got
    assert len({round(v, 6) for v in vals.values()}) == 4


def test_ld_zero_when_logits_equal():
    torch.manual_seed(2)
    for k in (2, 5):
        z = torch.randn(6, k) * 4
        y = torch.randint(0, k, (6,))
        assert abs(ld_loss(z, z.clone(), y).item()) < 1e-6


def test_ld_gradient_only_to_student_and_matches_finite_differences():
    zs = torch.tensor(LS2, requires_grad=True)
    zt = torch.tensor(LT2, requires_grad=True)
    ld_loss(zs, zt, torch.tensor(Y2)).backward()
    assert zt.grad is None
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    zs64 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    zt64 = torch.randn(4, 3, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 2])
    assert torch.autograd.gradcheck(lambda a: ld_loss(a, zt64, y, beta=0.7), (zs64,))


def test_ld_empty_and_extreme_inputs():
    zs = torch.zeros(0, 2, requires_grad=True)
    out = ld_loss(zs, torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))
    assert out.item() == 0.0
    out.backward()
    big = torch.tensor([[1e4, -1e4], [-3e3, 3e3]])
    out = ld_loss(big, -big, torch.tensor([0, 1]), temperature=1.0)
    assert torch.isfinite(out) and out.item() > 0


# ----------------------------------------------------------------------------------------------
# CD loss
# ----------------------------------------------------------------------------------------------


def test_cd_hand_values():
    # 2x2: G_s = I, G_t = [[1, 1/sqrt2], [1/sqrt2, 1]] -> 2 * (1/sqrt2)^2 = 1
    e_s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    e_t = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert cd_loss(e_s, e_t).item() == pytest.approx(1.0, rel=1e-6)
    # 3x3 with unnormalised rows: teacher rows 1 and 2 parallel -> G_t off-diagonal (0,1) = 1
    e_s = torch.eye(3)
    e_t = torch.tensor([[1.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    assert cd_loss(e_s, e_t).item() == pytest.approx(2.0, rel=1e-6)
    # different widths: teacher rows [1,0], [0,1], [3,4]/5 -> off-diagonals 0.6 and 0.8
    e_t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
    assert cd_loss(e_s, e_t).item() == pytest.approx(2 * (0.36 + 0.64), rel=1e-6)


def test_cd_zero_for_identical_and_scaling_invariance():
    torch.manual_seed(3)
    e = torch.randn(6, 16)
    assert cd_loss(e, e.clone()).item() == pytest.approx(0.0, abs=1e-8)
    e_t = torch.randn(6, 16)
    base = cd_loss(e, e_t).item()
    assert base > 0.1
    scale = torch.rand(6, 1) * 10 + 0.1
    assert cd_loss(e * scale, e_t).item() == pytest.approx(base, rel=1e-5)
    assert cd_loss(e, e_t * scale.flip(0)).item() == pytest.approx(base, rel=1e-5)


def test_cd_permutation_consistency():
    torch.manual_seed(4)
    e_s, e_t = torch.randn(5, 8), torch.randn(5, 8)
    base = cd_loss(e_s, e_t).item()
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert cd_loss(e_s[perm], e_t[perm]).item() == pytest.approx(base, rel=1e-5)
    assert abs(cd_loss(e_s[perm], e_t).item() - base) > 1e-3


def test_cd_gradient_and_empty():
    e_s = torch.randn(4, 8, requires_grad=True)
    e_t = torch.randn(4, 8, requires_grad=True)
    cd_loss(e_s, e_t).backward()
    assert e_t.grad is None and e_s.grad.abs().sum() > 0
    empty = torch.zeros(0, 8, requires_grad=True)
    out = cd_loss(empty, torch.zeros(0, 8))
    assert out.item() == 0.0
    out.backward()


# ----------------------------------------------------------------------------------------------
# CD person selection
# ----------------------------------------------------------------------------------------------

LUT, CQ = 5, 4


def _probs_for(own):
    """Rows of OIM probabilities whose own-class column (pid-1) carries the given value."""
    rows = []
    for pid, value in own:
        row = [0.01] * (LUT + CQ)
        if 1 <= pid <= LUT:
            row[pid - 1] = value
        else:
            row[LUT + 1] = value
        rows.append(row)
    return torch.tensor(rows)


def test_select_duplicate_cluster_keeps_best():
    boxes = torch.tensor([
        [10.0, 10.0, 50.0, 110.0],
        [11.0, 10.0, 51.0, 111.0],   # near-duplicates of box 0, pid 1
        [10.0, 12.0, 49.0, 110.0],
        [200.0, 10.0, 240.0, 110.0],  # pid 1 again but far away: survives
    ])
    pids = torch.tensor([1, 1, 1, 1])
    probs = _probs_for([(1, 0.2), (1, 0.9), (1, 0.5), (1, 0.1)])
    keep = select_cd_persons(boxes, pids, probs, lut_size=LUT)
    assert keep.dtype == torch.int64
    assert keep.tolist() == [1, 3]
    probs = _probs_for([(1, 0.95), (1, 0.9), (1, 0.5), (1, 0.1)])
    assert select_cd_persons(boxes, pids, probs, lut_size=LUT).tolist() == [0, 3]


def test_select_different_ids_and_images_do_not_suppress():
    boxes = torch.tensor([[10.0, 10.0, 50.0, 110.0], [11.0, 10.0, 51.0, 111.0],
                          [12.0, 11.0, 50.0, 110.0]])
    pids = torch.tensor([1, 2, 5555])
    probs = _probs_for([(1, 0.9), (2, 0.3), (5555, 0.4)])
    assert select_cd_persons(boxes, pids, probs, lut_size=LUT).tolist() == [0, 1, 2]
    # same id, same coordinates, different images: both kept, in list and tensor forms
    same = torch.tensor([[10.0, 10.0, 50.0, 110.0]])
    p1 = _probs_for([(3, 0.9)])
    keep = select_cd_persons([same, same.clone()], [torch.tensor([3]), torch.tensor([3])],
                             [p1, p1.clone()], lut_size=LUT)
    assert keep.tolist() == [0, 1]
    keep = select_cd_persons(torch.cat([same, same]), torch.tensor([3, 3]),
                             torch.cat([p1, p1]), lut_size=LUT, image_ids=torch.tensor([0, 1]))
    assert keep.tolist() == [0, 1]
    # ... and the same pair in one image collapses
    keep = select_cd_persons(torch.cat([same, same]), torch.tensor([3, 3]),
                             torch.cat([p1, p1]), lut_size=LUT, image_ids=torch.tensor([1, 1]))
    assert len(keep) == 1


def test_select_drops_tiny_and_background():
    boxes = torch.tensor([
        [10.0, 10.0, 10.005, 110.0],  # width 0.005 < 0.01
        [10.0, 10.0, 50.0, 10.001],   # height 0.001
        [10.0, 10.0, 50.0, 110.0],    # background
        [60.0, 10.0, 100.0, 110.0],   # kept
        [10.0, 10.0, 10.02, 10.02],   # 0.02 x 0.02: large enough
    ])
    pids = torch.tensor([1, 2, 0, 3, 4])
    probs = _probs_for([(1, 0.9), (2, 0.9), (0, 0.9), (3, 0.5), (4, 0.5)])
    assert select_cd_persons(boxes, pids, probs, lut_size=LUT).tolist() == [3, 4]
    assert select_cd_persons(boxes, pids, probs, lut_size=LUT, min_size=0.03).tolist() == [3]
    empty = select_cd_persons(boxes[:3], pids[:3], probs[:3], lut_size=LUT)
    assert empty.numel() == 0 and empty.dtype == torch.int64


def test_oim_scores_columns_respect_lut_size():
    probs = torch.tensor([
        [0.10, 0.20, 0.05, 0.30, 0.15, 0.02, 0.08, 0.06, 0.04],
        [0.10, 0.20, 0.05, 0.30, 0.15, 0.02, 0.08, 0.06, 0.04],
        [0.10, 0.20, 0.05, 0.30, 0.15, 0.02, 0.08, 0.06, 0.04],
    ])
    logits = probs.log() + 1.7  # softmax over all columns gives probs back
    pids = torch.tensor([2, 5555, 0])
    s5 = oim_scores(logits, pids, lut_size=5)
    s3 = oim_scores(logits, pids, lut_size=3)
    assert s5.tolist() == pytest.approx([0.20, 0.08, 0.0], abs=1e-6)   # col 1; max cols 5..8
    assert s3.tolist() == pytest.approx([0.20, 0.30, 0.0], abs=1e-6)   # col 1; max cols 3..8
    # the same choice inside the selection: two overlapping unlabeled boxes whose queue maxima
    # rank differently with lut_size 3 and 5
    sel_probs = torch.tensor([
        [0.0, 0.0, 0.0, 0.50, 0.0, 0.10, 0.0, 0.0, 0.0],  # queue max: lut 3 -> 0.5, lut 5 -> 0.1
        [0.0, 0.0, 0.0, 0.05, 0.0, 0.30, 0.0, 0.0, 0.0],  # lut 3 -> 0.3, lut 5 -> 0.3
    ])
    boxes = torch.tensor([[10.0, 10.0, 50.0, 110.0], [11.0, 10.0, 51.0, 111.0]])
    pids = torch.tensor([5555, 5555])
    assert select_cd_persons(boxes, pids, sel_probs, lut_size=3).tolist() == [0]
    assert select_cd_persons(boxes, pids, sel_probs, lut_size=5).tolist() == [1]
    # labeled: own column pid-1
    lab = torch.tensor([[0.6, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                        [0.1, 0.7, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    assert select_cd_persons(boxes, torch.tensor([2, 2]), lab, lut_size=5).tolist() == [1]
    assert select_cd_persons(boxes, torch.tensor([1, 1]), lab, lut_size=5).tolist() == [0]


def test_select_rejects_ids_outside_the_table():
    boxes = torch.tensor([[10.0, 10.0, 50.0, 110.0]])
    probs = torch.full((1, 9), 1 / 9)
    with pytest.raises(ValueError):
        select_cd_persons(boxes, torch.tensor([4]), probs, lut_size=3)
    with pytest.raises(ValueError):
        oim_scores(probs, torch.tensor([6]), lut_size=5)
    assert select_cd_persons(boxes, torch.tensor([3]), probs, lut_size=3).tolist() == [0]


def test_select_iou_exact_at_high_group_index():
    # IoU just above / below 0.7 for a narrow unlabeled pair in the 5th image: the group
    # separation inside batched_nms must not blur the coordinates (torchvision's float32
    # coordinate trick with raw group 4 * BIG + 5555 shifts boxes by ~4e7, 4 px resolution).
    def pair(shift):
        # boxes 20 wide: IoU = (20 - s) / (20 + s)
        return torch.tensor([[1400.0, 500.0, 1420.0, 700.0],
                             [1400.0 + shift, 500.0, 1420.0 + shift, 700.0]])
    probs = _probs_for([(5555, 0.9), (5555, 0.8)])
    img = torch.tensor([4, 4])
    pids = torch.tensor([5555, 5555])
    for iou, expected in ((0.71, [0]), (0.69, [0, 1])):
        shift = 20 * (1 - iou) / (1 + iou)
        keep = select_cd_persons(pair(shift), pids, probs, lut_size=LUT, image_ids=img)
        assert keep.tolist() == expected, iou


# ----------------------------------------------------------------------------------------------
# DFD
# ----------------------------------------------------------------------------------------------


def _grid(v, n, n_img):
    """v / n_img * n in float32, the original's order of operations."""
    return float(np.float32(v) / np.float32(n_img) * np.float32(n))


def ref_masks(boxes_per_image, h, w, h_img, w_img):
    """SPEC 6 masks with explicit loops over images, boxes and cells: the value of a box is
    1 / its UNCLAMPED area, the cells it covers are clamped to the grid (the original's slicing)."""
    fgs, bgs = [], []
    for boxes in boxes_per_image:
        fg = [[0.0] * w for _ in range(h)]
        for x1, y1, x2, y2 in boxes:
            c0, c1 = math.floor(_grid(x1, w, w_img)), math.ceil(_grid(x2, w, w_img))
            r0, r1 = math.floor(_grid(y1, h, h_img)), math.ceil(_grid(y2, h, h_img))
            value = 1.0 / ((r1 - r0 + 1) * (c1 - c0 + 1))
            for r in range(max(r0, 0), min(r1, h - 1) + 1):
                for c in range(max(c0, 0), min(c1, w - 1) + 1):
                    fg[r][c] = max(fg[r][c], value)
        uncovered = sum(1 for r in range(h) for c in range(w) if fg[r][c] == 0)
        bg = [[(1.0 / uncovered if fg[r][c] == 0 else 0.0) for c in range(w)] for r in range(h)]
        fgs.append(fg)
        bgs.append(bg)
    return torch.tensor(fgs, dtype=torch.float32), torch.tensor(bgs, dtype=torch.float32)


# grid 6 x 8 on a 48 x 64 padded tensor (stride 8)
HAND_BOXES = [
    [[9.0, 10.0, 30.0, 27.0],        # inside: cols 1..4, rows 1..4 -> 1/16
     [50.0, 40.0, 64.0, 48.0]],      # border: cols 6..8, rows 5..6 -> 1/6 (unclamped area),
                                     # covering cols 6..7, row 5 only
    [[0.0, 0.0, 40.0, 40.0],         # big: rows/cols 0..5 -> 1/36
     [16.0, 16.0, 24.0, 24.0]],      # small inside it: rows/cols 2..3 -> 1/4 (max)
    [],                              # no boxes: background everywhere
    [[0.0, 0.0, 64.0, 48.0]],        # full cover: rows 0..6 x cols 0..8 -> 1/63, bg zero
]


def _as_tensors(boxes_per_image):
    return [torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes_per_image]


def test_dfd_masks_hand_case():
    fg, bg = dfd_masks(_as_tensors(HAND_BOXES), (6, 8), (48, 64))
    rfg, rbg = ref_masks(HAND_BOXES, 6, 8, 48, 64)
    assert fg.shape == bg.shape == (4, 6, 8)
    torch.testing.assert_close(fg, rfg)
    torch.testing.assert_close(bg, rbg)
    # explicit cells
    assert fg[0, 2, 2].item() == pytest.approx(1 / 16)
    assert fg[0, 1, 1].item() == pytest.approx(1 / 16)
    assert fg[0, 4, 4].item() == pytest.approx(1 / 16)
    assert fg[0, 0, 1].item() == 0 and fg[0, 1, 5].item() == 0
    assert fg[0, 5, 6].item() == pytest.approx(1 / 6) and fg[0, 5, 7].item() == pytest.approx(1 / 6)
    assert fg[1, 2, 3].item() == pytest.approx(0.25) and fg[1, 0, 0].item() == pytest.approx(1 / 36)
    assert fg[1, 5, 5].item() == pytest.approx(1 / 36) and fg[1, 5, 6].item() == 0
    assert (fg[2] == 0).all() and torch.allclose(bg[2], torch.full((6, 8), 1 / 48))
    assert torch.allclose(fg[3], torch.full((6, 8), 1 / 63)) and (bg[3] == 0).all()
    # background of image 0: 48 - 16 - 2 uncovered cells
    assert bg[0, 0, 0].item() == pytest.approx(1 / 30) and bg[0, 2, 2].item() == 0
    assert bg.sum(dim=(1, 2)).tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0])


def test_dfd_masks_random_against_loop_reference():
    g = torch.Generator().manual_seed(5)
    for h, w, h_img, w_img in [(7, 9, 56, 72), (5, 11, 37, 83), (13, 4, 100, 30)]:
        boxes = []
        for count in (0, 1, 3, 6):
            xy = torch.rand(count, 2, generator=g) * torch.tensor([w_img, h_img])
            wh = torch.rand(count, 2, generator=g) * torch.tensor([w_img, h_img]) * 0.6
            b = torch.cat([xy, xy + wh], dim=1)
            boxes.append(b.tolist())
        fg, bg = dfd_masks(_as_tensors(boxes), (h, w), (h_img, w_img))
        rfg, rbg = ref_masks(boxes, h, w, h_img, w_img)
        torch.testing.assert_close(fg, rfg)
        torch.testing.assert_close(bg, rbg)


def ref_attention(f, temp):
    n, c, h, w = f.shape
    a_sp = torch.zeros(n, h, w, dtype=torch.float64)
    a_ch = torch.zeros(n, c, dtype=torch.float64)
    for i in range(n):
        sp = [[sum(abs(f[i, k, y, x].item()) for k in range(c)) / c for x in range(w)]
              for y in range(h)]
        z = sum(math.exp(v / temp) for row in sp for v in row)
        for y in range(h):
            for x in range(w):
                a_sp[i, y, x] = h * w * math.exp(sp[y][x] / temp) / z
        ch = [sum(abs(f[i, k, y, x].item()) for y in range(h) for x in range(w)) / (h * w)
              for k in range(c)]
        z = sum(math.exp(v / temp) for v in ch)
        for k in range(c):
            a_ch[i, k] = c * math.exp(ch[k] / temp) / z
    return a_sp, a_ch


def test_dfd_attention_against_formulas():
    torch.manual_seed(6)
    f = torch.randn(2, 3, 4, 5)
    a_sp, a_ch = dfd_attention(f, 0.5)
    r_sp, r_ch = ref_attention(f.double(), 0.5)
    torch.testing.assert_close(a_sp.double(), r_sp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a_ch.double(), r_ch, rtol=1e-5, atol=1e-6)
    assert a_sp.sum(dim=(1, 2)).tolist() == pytest.approx([20.0, 20.0], rel=1e-5)
    assert a_ch.sum(dim=1).tolist() == pytest.approx([3.0, 3.0], rel=1e-5)


def _dfd_case(seed=7, c=4):
    torch.manual_seed(seed)
    f_s = torch.randn(4, c, 6, 8)
    f_t = torch.randn(4, c, 6, 8)
    return f_s, f_t, _as_tensors(HAND_BOXES), (48, 64)


def ref_terms(f_s, f_t, boxes, temp=0.5):
    """fg, bg and attention terms from the reference attention and masks (float64)."""
    n, c, h, w = f_t.shape
    f_s, f_t = f_s.double(), f_t.double()
    sp_s, ch_s = ref_attention(f_s, temp)
    sp_t, ch_t = ref_attention(f_t, temp)
    m_fg, m_bg = ref_masks(boxes, h, w, 48, 64)
    fg = bg = 0.0
    for i in range(n):
        for k in range(c):
            d2 = (f_s[i, k] - f_t[i, k]) ** 2 * sp_t[i] * ch_t[i, k]
            fg += (d2 * m_fg[i].double()).sum().item()
            bg += (d2 * m_bg[i].double()).sum().item()
    att = ((ch_s - ch_t).abs().sum() + (sp_s - sp_t).abs().sum()).item() / n
    return fg / n, bg / n, att


def test_dfd_terms_at_init_against_reference():
    f_s, f_t, boxes, size = _dfd_case()
    loss = DFDLoss(4)
    terms = loss.forward_terms(f_s, f_t, boxes, size)
    assert set(terms) == {"fg", "bg", "attention", "global"}
    fg, bg, att = ref_terms(f_s, f_t, HAND_BOXES)
    assert terms["fg"].item() == pytest.approx(fg, rel=1e-5)
    assert terms["bg"].item() == pytest.approx(bg, rel=1e-5)
    assert terms["attention"].item() == pytest.approx(att, rel=1e-5)
    # zero-initialised last convs: the global term is the plain squared distance / N
    plain = ((f_s.double() - f_t.double()) ** 2).sum().item() / 4
    assert terms["global"].item() == pytest.approx(plain, rel=1e-5)
    assert fg > 0 and bg > 0 and att > 0


def _ref_context(f, conv_mask, block):
    """GCNet block written out: softmax over positions of a 1x1 conv, weighted sum, transform."""
    n, c, h, w = f.shape
    wm, bm = conv_mask.weight.detach().reshape(c), conv_mask.bias.detach()
    logits = torch.einsum("nchw,c->nhw", f, wm) + bm
    att = torch.softmax(logits.reshape(n, -1), dim=1).reshape(n, h, w)
    ctx = torch.einsum("nchw,nhw->nc", f, att)
    conv1, ln, _, conv2 = block
    hid = ctx @ conv1.weight.detach().reshape(c // 2, c).t() + conv1.bias.detach()
    mu = hid.mean(dim=1, keepdim=True)
    var = hid.var(dim=1, unbiased=False, keepdim=True)
    hid = (hid - mu) / torch.sqrt(var + ln.eps) * ln.weight.detach().reshape(-1) + \
        ln.bias.detach().reshape(-1)
    hid = hid.clamp(min=0)
    out = hid @ conv2.weight.detach().reshape(c, c // 2).t() + conv2.bias.detach()
    return f + out[:, :, None, None]


def _trained_dfd():
    """A 4-channel DFDLoss whose context blocks are far from their zero init."""
    loss = DFDLoss(4)
    torch.manual_seed(9)
    with torch.no_grad():
        for p in loss.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return loss


def test_dfd_global_term_with_trained_blocks_against_reference():
    f_s, f_t, boxes, size = _dfd_case(seed=8)
    loss = _trained_dfd()
    glob = loss.forward_terms(f_s, f_t, boxes, size)["global"].item()
    ref = ((_ref_context(f_s, loss.conv_mask_s, loss.channel_add_conv_s)
            - _ref_context(f_t, loss.conv_mask_t, loss.channel_add_conv_t)) ** 2).sum().item() / 4
    assert glob == pytest.approx(ref, rel=1e-5)
    plain = ((f_s - f_t) ** 2).sum().item() / 4
    assert abs(glob - plain) > 1e-3 * plain


def test_dfd_global_term_gradients_equal_those_of_the_direct_formula():
    """The global term is computed expanded (sum D^2 + 2 da.sum D + HW |da|^2); its gradients for
    the student map and both context blocks are those of sum (G_s(F_s) - G_t(F_t))^2, written
    directly and computed in float64 (float32 itself is off by ~5e-6 on these ~1e-3 values)."""
    import copy

    f_s, f_t, boxes, size = _dfd_case(seed=8)
    loss = _trained_dfd()
    names = [name for name, _ in loss.named_parameters() if "conv_mask" in name or "channel_add" in name]
    fs = f_s.clone().requires_grad_(True)
    got = torch.autograd.grad(loss.forward_terms(fs, f_t, boxes, size)["global"],
                              [fs, *(dict(loss.named_parameters())[n] for n in names)])
    ref_loss = copy.deepcopy(loss).double()
    ref_params = [dict(ref_loss.named_parameters())[n] for n in names]
    fs64 = f_s.double().requires_grad_(True)
    out_s = fs64 + ref_loss.channel_add_conv_s(_context_of(fs64, ref_loss.conv_mask_s))
    out_t = f_t.double() + ref_loss.channel_add_conv_t(_context_of(f_t.double(), ref_loss.conv_mask_t))
    ref = torch.autograd.grad(((out_s - out_t) ** 2).sum() / 4, [fs64, *ref_params])
    for name, g, r in zip(["student map"] + names, got, ref):
        torch.testing.assert_close(g.double(), r, rtol=0, atol=2e-5 * max(1.0, r.abs().max().item()), msg=name)
    assert max(r.abs().max().item() for r in ref[1:]) > 1e-4  # the blocks do get gradients


def _context_of(f, conv_mask):
    """The context vector (N x C x 1 x 1) of a GCNet block: softmax over positions of a 1x1 conv."""
    n, c, h, w = f.shape
    att = torch.softmax((torch.einsum("nchw,c->nhw", f, conv_mask.weight.reshape(c)) + conv_mask.bias).reshape(n, -1),
                        dim=1)
    return torch.einsum("nchw,nhw->nc", f, att.reshape(n, h, w))[:, :, None, None]


def test_dfd_init_and_names():
    loss = DFDLoss(8)
    names = set(loss.state_dict())
    for side in ("s", "t"):
        assert f"conv_mask_{side}.weight" in names and f"conv_mask_{side}.bias" in names
        for i in (0, 1, 3):
            assert f"channel_add_conv_{side}.{i}.weight" in names
        block = getattr(loss, f"channel_add_conv_{side}")
        assert isinstance(block[1], torch.nn.LayerNorm)
        assert tuple(block[1].normalized_shape) == (4, 1, 1)
        assert block[0].out_channels == 4 and block[3].in_channels == 4
        assert (block[3].weight == 0).all() and (block[3].bias == 0).all()
        assert getattr(loss, f"conv_mask_{side}").weight.abs().sum() > 0
    assert loss.align is None and not any(k.startswith("align") for k in names)


def test_dfd_weighted_sum():
    f_s, f_t, boxes, size = _dfd_case(seed=10)
    loss = DFDLoss(4, temp=0.7, alpha=2.0, beta=3.0, gamma=0.5, lam=0.25)
    t = {k: v.item() for k, v in loss.forward_terms(f_s, f_t, boxes, size).items()}
    fg, bg, att = ref_terms(f_s, f_t, HAND_BOXES, temp=0.7)
    assert t["fg"] == pytest.approx(fg, rel=1e-5) and t["attention"] == pytest.approx(att, rel=1e-5)
    expected = 2.0 * t["fg"] + 3.0 * t["bg"] + 0.5 * t["attention"] + 0.25 * t["global"]
    assert loss(f_s, f_t, boxes, size).item() == pytest.approx(expected, rel=1e-5)
    default = DFDLoss(4)
    d = {k: v.item() for k, v in default.forward_terms(f_s, f_t, boxes, size).items()}
    expected = 5e-5 * d["fg"] + 2.5e-5 * d["bg"] + 5e-5 * d["attention"] + 5e-7 * d["global"]
    assert default(f_s, f_t, boxes, size).item() == pytest.approx(expected, rel=1e-5)


def test_dfd_gradients():
    f_s, f_t, boxes, size = _dfd_case(seed=11)
    f_s.requires_grad_(True)
    f_t.requires_grad_(True)
    loss = DFDLoss(4)
    loss(f_s, f_t, boxes, size).backward()
    assert f_t.grad is None
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    for side in ("s", "t"):  # at init only the zeroed last conv receives a non-zero gradient
        last = getattr(loss, f"channel_add_conv_{side}")[3]
        assert last.weight.grad.abs().sum() > 0 and last.bias.grad.abs().sum() > 0
    # once the last convs are non-zero every learnable part of both blocks gets gradient
    loss.zero_grad()
    with torch.no_grad():
        for side in ("s", "t"):
            getattr(loss, f"channel_add_conv_{side}")[3].weight.normal_(0, 0.5)
    f_s.grad = None
    loss(f_s, f_t, boxes, size).backward()
    assert f_t.grad is None
    for name, p in loss.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_dfd_channel_mismatch_align():
    torch.manual_seed(12)
    loss = DFDLoss(4, student_channels=3)
    assert isinstance(loss.align, torch.nn.Conv2d)
    assert (loss.align.in_channels, loss.align.out_channels) == (3, 4)
    assert loss.align.kernel_size == (1, 1)
    f_s = torch.randn(4, 3, 6, 8, requires_grad=True)
    f_t = torch.randn(4, 4, 6, 8)
    boxes = _as_tensors(HAND_BOXES)
    terms = loss.forward_terms(f_s, f_t, boxes, (48, 64))
    # the terms are those of the aligned student map
    aligned = loss.align(f_s).detach()
    fg, bg, att = ref_terms(aligned, f_t, HAND_BOXES)
    assert terms["fg"].item() == pytest.approx(fg, rel=1e-5)
    assert terms["attention"].item() == pytest.approx(att, rel=1e-5)
    assert terms["global"].item() == pytest.approx(
        ((aligned - f_t) ** 2).sum().item() / 4, rel=1e-5)
    loss(f_s, f_t, boxes, (48, 64)).backward()
    assert loss.align.weight.grad.abs().sum() > 0 and f_s.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        loss(torch.randn(4, 4, 6, 8), f_t, boxes, (48, 64))
    assert DFDLoss(4, student_channels=4).align is None


def test_dfd_no_boxes_anywhere():
    f_s, f_t, _, size = _dfd_case(seed=13)
    loss = DFDLoss(4)
    terms = loss.forward_terms(f_s, f_t, [torch.zeros(0, 4)] * 4, size)
    assert terms["fg"].item() == 0.0
    fg, bg, _ = ref_terms(f_s, f_t, [[], [], [], []])
    assert terms["bg"].item() == pytest.approx(bg, rel=1e-5)
