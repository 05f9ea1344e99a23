#!/usr/bin/env python
"""Write a synthetic person-search world in the official CUHK-SYSU and PRW layouts.

    python tools/make_synthetic.py --out data/synthetic --seed 0

writes ``data/synthetic/CUHK-SYSU`` and ``data/synthetic/PRW`` with every file the readers in
``datasets/`` read (SPEC 3): JPEG scenes, Images.mat / pool.mat / Train.mat / TestG<N>.mat for
CUHK-SYSU, per-frame annotation .mat files, frame_train.mat / frame_test.mat and a CRLF
query_info.txt for PRW. The .mat files are written with scipy.io.savemat so that loadmat returns
the same structures as for the released files.

The scenes are meant to be learnable by a detector and a re-id model: varied backgrounds
(gradients, smooth blotches, noise, clutter shapes, a ground plane) with person-like figures (head
and hair, torso, arms, legs, shoes) whose top colour, bottom colour and top pattern (solid,
stripes, checks, ...) identify them; scale, position, pose and lighting vary between
appearances. Unlabeled people (5555 / PRW id -2) wear combinations no labeled identity wears.

Importable: ``generate(out_dir, seed=0, **options)`` (both datasets), ``generate_cuhk(root,
seed=0, **options)``, ``generate_prw(root, seed=0, **options)``; ``options`` are the fields of
:class:`SynthOptions` (difficulty knobs), ``preset="hard"`` starts from a harder setting. The
output is a deterministic function of the seed and the options (the .mat headers carry a date).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import scipy.io

__all__ = [
    "SynthOptions",
    "PRESETS",
    "make_options",
    "generate",
    "generate_cuhk",
    "generate_prw",
    "main",
]


@dataclass
class SynthOptions:
    """Size and difficulty knobs of the synthetic world (the same for both datasets)."""

    train_ids: int = 20  # labeled training identities
    test_ids: int = 30  # test identities (CUHK-SYSU: one query each)
    train_images: int = 150
    test_images: int = 120  # CUHK-SYSU: the pool (>= 101 for a full TestG100); PRW: test frames
    train_appearances: Tuple[int, int] = (4, 8)  # images per training identity (min, max)
    test_appearances: Tuple[int, int] = (2, 4)  # images per test identity (>= 2)
    max_persons: int = 4  # people per image at most (labeled + unlabeled)
    unlabeled: Tuple[int, int] = (0, 2)  # unlabeled people per image (min, max)
    image_width: int = 320
    image_height: int = 240
    person_scale: Tuple[float, float] = (0.3, 0.75)  # person height / image height
    num_colors: int = 10  # clothing colours
    num_patterns: int = 4  # top patterns (solid, h-stripes, v-stripes, checks, dots, diagonal)
    clutter: float = 0.5  # 0..1 background clutter (shapes, blotches)
    # 0..1 share of clutter shapes and occluders painted in the clothing colours (and, for
    # rectangles, patterns): distractors that look like clothing; 0 draws nothing extra
    clutter_palette: float = 0.0
    occlusion: float = 0.1  # probability a person is partly hidden behind an object
    max_overlap: float = 0.3  # max IoU between two people of one image
    noise: float = 6.0  # pixel noise std (0..255)
    blur: float = 0.6  # Gaussian blur sigma of the whole image (0 = none)
    jpeg_quality: int = 90
    # CUHK-SYSU
    gallery_sizes: Tuple[int, ...] = (50, 100)  # TestG<N>.mat files (50 always; capped at pool - 1)
    zero_size_boxes: int = 2  # Images.mat entries of zero width/height (dropped by readers)
    # PRW
    cameras: int = 6
    queries_per_id: int = 1  # PRW queries per test identity (from different cameras)
    edge_prob: float = 0.03  # PRW: a non-query person partly outside the top/left border


PRESETS: Dict[str, Dict] = {
    "default": {},
    "hard": dict(
        train_ids=60,
        test_ids=60,
        train_images=400,
        test_images=300,
        train_appearances=(3, 8),
        max_persons=7,
        unlabeled=(1, 4),
        image_width=256,
        image_height=192,
        # People 0.3-0.75 of the image height, clutter 0.5, occlusion 0.15: with people down to
        # 0.15 of the height, clutter 1.0 and occlusion 0.35, a ResNet-18 trained from random
        # weights at 160x120 stayed at chance re-id (mAP < 0.08 after 600 and 1200 steps, measured): too
        # hard to show anything in CPU minutes. Sixty identities sharing 7 colours x 3 patterns,
        # distractors in the clothing colours, noise, blur and JPEG keep the task unsaturated.
        person_scale=(0.3, 0.75),
        num_colors=7,
        num_patterns=3,
        clutter=0.5,
        clutter_palette=0.6,
        occlusion=0.15,
        max_overlap=0.45,
        noise=12.0,
        blur=0.9,
        jpeg_quality=75,
        edge_prob=0.15,
    ),
}


def make_options(preset: str = "default", **overrides) -> SynthOptions:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: expected one of {sorted(PRESETS)}")
    values = dict(PRESETS[preset])
    names = {f.name for f in dataclasses.fields(SynthOptions)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}; options are {sorted(names)}")
    values.update(overrides)
    opts = SynthOptions(**values)
    _validate(opts)
    return opts


def _validate(o: SynthOptions) -> None:
    def need(cond, msg):
        if not cond:
            raise ValueError(f"invalid synthetic options: {msg}")

    need(o.train_ids >= 1 and o.test_ids >= 1, "train_ids and test_ids must be >= 1")
    need(o.train_images >= 1 and o.test_images >= 2, "need >= 1 train and >= 2 test images")
    need(o.max_persons >= 1, "max_persons must be >= 1")
    need(2 <= o.test_appearances[0] <= o.test_appearances[1], "test_appearances must be >= 2")
    need(1 <= o.train_appearances[0] <= o.train_appearances[1], "train_appearances must be >= 1")
    need(0 <= o.unlabeled[0] <= o.unlabeled[1], "unlabeled = (min, max)")
    need(0 < o.person_scale[0] <= o.person_scale[1] <= 1.0, "person_scale within (0, 1]")
    need(o.image_width >= 32 and o.image_height >= 32, "images of at least 32 x 32")
    need(2 <= o.num_colors <= 64 and 1 <= o.num_patterns <= len(PATTERNS), "num_colors / num_patterns")
    need(o.test_appearances[1] <= o.test_images, "test_appearances exceed test_images")
    need(o.cameras >= 1 and o.queries_per_id >= 1, "cameras and queries_per_id must be >= 1")
    need(0.0 <= o.clutter_palette <= 1.0, "clutter_palette within [0, 1]")


# --------------------------------------------------------------------------------------------
# appearance

PATTERNS = ("solid", "hstripes", "vstripes", "checks", "dots", "diagonal")
_BASE_COLORS = [
    (220, 30, 30), (30, 160, 40), (30, 60, 210), (235, 215, 40), (240, 240, 240), (25, 25, 25),
    (240, 130, 20), (140, 40, 170), (30, 200, 210), (230, 90, 180), (120, 120, 120), (130, 80, 35),
    (20, 30, 100), (130, 140, 40), (20, 120, 120), (250, 180, 170),
]
_SKIN = [(240, 200, 170), (210, 160, 120), (170, 120, 80), (110, 75, 50)]
_HAIR = [(20, 20, 20), (90, 60, 30), (200, 170, 90), (150, 150, 150)]


def _palette(n: int) -> np.ndarray:
    if n <= len(_BASE_COLORS):
        return np.array(_BASE_COLORS[:n], dtype=np.float32)
    extra = []
    for i in range(n - len(_BASE_COLORS)):
        hsv = np.uint8([[[int(180 * i / (n - len(_BASE_COLORS))), 200, 90 + 120 * (i % 2)]]])
        extra.append(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])
    return np.concatenate([np.array(_BASE_COLORS, np.float32), np.array(extra, np.float32)])


@dataclass
class Look:
    top: int
    bottom: int
    pattern: int
    skin: int
    hair: int
    shorts: bool
    width_ratio: float  # box width / height


def _make_looks(rng, opts: SynthOptions, num_labeled: int) -> Tuple[List[Look], List[Tuple]]:
    """Distinct (top, bottom, pattern) combinations for the labeled identities."""
    combos = [
        (t, b, p)
        for t in range(opts.num_colors)
        for b in range(opts.num_colors)
        for p in range(opts.num_patterns)
        if t != b
    ]
    order = rng.permutation(len(combos))
    looks = []
    for i in range(num_labeled):
        # beyond the number of combinations identities share clothes (a harder world)
        t, b, p = combos[order[i % len(combos)]]
        looks.append(
            Look(t, b, p, int(rng.integers(len(_SKIN))), int(rng.integers(len(_HAIR))),
                 bool(rng.random() < 0.25), float(rng.uniform(0.34, 0.44)))
        )
    free = [combos[j] for j in order[num_labeled:]] or combos
    return looks, free


def _random_look(rng, free_combos) -> Look:
    t, b, p = free_combos[int(rng.integers(len(free_combos)))]
    return Look(t, b, p, int(rng.integers(len(_SKIN))), int(rng.integers(len(_HAIR))),
                bool(rng.random() < 0.25), float(rng.uniform(0.34, 0.44)))


def _fill_pattern(region: np.ndarray, color, pattern: str, period: int, phase: int) -> None:
    h, w = region.shape[:2]
    c1 = np.asarray(color, np.float32)
    c2 = np.clip(c1 * 0.35 + (255 - c1) * 0.45 if c1.mean() < 128 else c1 * 0.35, 0, 255)
    region[:] = c1
    if pattern == "solid" or h == 0 or w == 0:
        return
    yy, xx = np.mgrid[0:h, 0:w]
    half = max(1, period // 2)
    if pattern == "hstripes":
        mask = ((yy + phase) // half) % 2 == 1
    elif pattern == "vstripes":
        mask = ((xx + phase) // half) % 2 == 1
    elif pattern == "checks":
        mask = (((yy + phase) // half) + (xx // half)) % 2 == 1
    elif pattern == "dots":
        mask = (((yy + phase) % period) - period / 2) ** 2 + ((xx % period) - period / 2) ** 2 < (period / 4) ** 2
    else:  # diagonal
        mask = ((xx + yy + phase) // half) % 2 == 1
    region[mask] = c2


def _render_person(rng, look: Look, h: int, w: int, palette, light: float, patterns) -> Tuple[np.ndarray, np.ndarray]:
    """An RGB sprite (h, w, 3) float32 and its mask; the figure fills its box exactly."""
    img = np.zeros((h, w, 3), np.float32)
    mask = np.zeros((h, w), bool)
    jitter = rng.normal(0, 6, 3).astype(np.float32)
    top = np.clip(palette[look.top] * light + jitter, 0, 255)
    bottom = np.clip(palette[look.bottom] * light + jitter, 0, 255)
    skin = np.clip(np.array(_SKIN[look.skin], np.float32) * light, 0, 255)
    hair = np.clip(np.array(_HAIR[look.hair], np.float32) * light, 0, 255)
    shoe = np.array([35, 30, 30], np.float32) * light

    def Y(f):
        return int(round(f * h))

    def X(f):
        return int(round(f * w))

    def rect(x1, y1, x2, y2, color=None, pattern=None):
        x1, x2 = max(0, min(x1, w)), max(0, min(x2, w))
        y1, y2 = max(0, min(y1, h)), max(0, min(y2, h))
        if x2 <= x1 or y2 <= y1:
            return
        if pattern is not None:
            _fill_pattern(img[y1:y2, x1:x2], color, pattern, max(2, h // 14), int(rng.integers(4)))
        else:
            img[y1:y2, x1:x2] = color
        mask[y1:y2, x1:x2] = True

    # legs and shoes (spread varies with the pose)
    spread = rng.uniform(0.0, 0.07)
    leg_top, leg_bot = Y(0.54), Y(0.94)
    for lx1, lx2 in ((0.24 - spread, 0.48 - spread / 2), (0.52 + spread / 2, 0.76 + spread)):
        if look.shorts:
            rect(X(lx1), leg_top, X(lx2), Y(0.70), bottom)
            rect(X(lx1 + 0.03), Y(0.70), X(lx2 - 0.03), leg_bot, skin)
        else:
            rect(X(lx1), leg_top, X(lx2), leg_bot, bottom)
        rect(X(lx1 - 0.02), leg_bot, X(lx2 + 0.02), h, shoe)
    # torso and arms in the top's colour and pattern
    pattern = patterns[look.pattern]
    rect(X(0.19), Y(0.17), X(0.81), Y(0.56), top, pattern)
    swing = rng.uniform(-0.03, 0.03)
    for ax1, ax2, s in ((0.0, 0.19, swing), (0.81, 1.0, -swing)):
        rect(X(ax1), Y(0.18 + s), X(ax2), Y(0.48 + s), top, pattern)
        rect(X(ax1), Y(0.48 + s), X(ax2), Y(0.53 + s), skin)
    # neck, head and hair
    rect(X(0.42), Y(0.14), X(0.58), Y(0.18), skin)
    cx, cy, ax, ay = w / 2.0, 0.085 * h, max(1.0, 0.2 * w), max(1.0, 0.085 * h)
    yy, xx = np.mgrid[0:max(1, Y(0.18)), 0:w]
    head = ((xx + 0.5 - cx) / ax) ** 2 + ((yy + 0.5 - cy) / ay) ** 2 <= 1.0
    img[: head.shape[0]][head] = skin
    hair_mask = head & (yy < 0.065 * h)
    img[: head.shape[0]][hair_mask] = hair
    mask[: head.shape[0]] |= head
    return img, mask


# --------------------------------------------------------------------------------------------
# scenes


def _clutter_look(rng, opts: SynthOptions, palette, patterns):
    """(colour, pattern or None) of one clutter shape or occluder.

    With probability ``opts.clutter_palette`` a clothing colour (and a clothing pattern), else a
    random colour; no random draw at all when the knob is 0, so worlds without it are unchanged."""
    if opts.clutter_palette > 0 and palette is not None and rng.random() < opts.clutter_palette:
        color = np.clip(palette[int(rng.integers(len(palette)))] + rng.normal(0, 8, 3), 0, 255)
        return tuple(float(v) for v in color), patterns[int(rng.integers(len(patterns)))]
    return tuple(float(v) for v in rng.uniform(20, 240, 3)), None


def _fill_rect(img: np.ndarray, x1: int, y1: int, x2: int, y2: int, color, pattern, rng) -> None:
    """A filled rectangle (corners included, as cv2.rectangle), plain or patterned."""
    if pattern is None:
        cv2.rectangle(img, (x1, y1), (x2, y2), color, -1)
        return
    H, W = img.shape[:2]
    xa, xb, ya, yb = max(0, min(x1, x2)), min(W, max(x1, x2) + 1), max(0, min(y1, y2)), min(H, max(y1, y2) + 1)
    if xb > xa and yb > ya:
        _fill_pattern(img[ya:yb, xa:xb], color, pattern, max(2, (yb - ya) // 6), int(rng.integers(4)))


def _background(rng, opts: SynthOptions, palette=None, patterns=PATTERNS) -> Tuple[np.ndarray, int]:
    H, W = opts.image_height, opts.image_width
    c1, c2 = rng.uniform(40, 230, 3), rng.uniform(40, 230, 3)
    angle = rng.uniform(0, np.pi)
    t = (np.float32(np.cos(angle)) * np.arange(W, dtype=np.float32)[None, :] / W
         + np.float32(np.sin(angle)) * np.arange(H, dtype=np.float32)[:, None] / H)
    t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
    c1, c2 = c1.astype(np.float32), c2.astype(np.float32)
    img = c1[None, None, :] + (c2 - c1)[None, None, :] * t[..., None]
    # ground plane below a horizon line
    horizon = int(H * rng.uniform(0.3, 0.6))
    ground = rng.uniform(50, 200, 3)
    g = np.linspace(0.85, 1.15, H - horizon, dtype=np.float32)[:, None, None]
    img[horizon:] = 0.3 * img[horizon:] + (0.7 * ground.astype(np.float32))[None, None, :] * g
    # smooth blotches (texture)
    if opts.clutter > 0:
        small = rng.normal(0, 1, (max(2, H // 24), max(2, W // 24), 3)).astype(np.float32)
        img += cv2.resize(small, (W, H), interpolation=cv2.INTER_CUBIC) * 25 * opts.clutter
    img = img.astype(np.float32)
    # clutter shapes: buildings / windows, trees, poles
    n_shapes = int(round(opts.clutter * 10)) + int(rng.integers(0, 3))
    for _ in range(n_shapes):
        color, pattern = _clutter_look(rng, opts, palette, patterns)
        kind = rng.integers(3)
        if kind == 0:
            x1, y1 = int(rng.integers(0, W)), int(rng.integers(0, horizon + 1))
            x2 = x1 + int(rng.integers(W // 12, W // 3))
            y2 = min(H - 1, horizon + int(rng.integers(0, H // 8)))
            _fill_rect(img, x1, y1, x2, max(y1 + 4, y2), color, pattern, rng)
            if rng.random() < 0.6:  # windows
                wc = tuple(float(v) for v in rng.uniform(20, 240, 3))
                step = max(6, (x2 - x1) // 4)
                for wx in range(x1 + 3, x2 - 3, step):
                    for wy in range(y1 + 3, max(y1 + 4, y2) - 3, step):
                        cv2.rectangle(img, (wx, wy), (wx + step // 2, wy + step // 2), wc, -1)
        elif kind == 1:
            c = (int(rng.integers(0, W)), int(rng.integers(0, H)))
            cv2.circle(img, c, int(rng.integers(4, max(5, H // 8))), color, -1)
        else:
            x = int(rng.integers(0, W))
            cv2.line(img, (x, int(rng.integers(0, horizon + 1))), (x + int(rng.integers(-8, 9)), int(rng.integers(horizon, H))),
                     color, int(rng.integers(1, 4)))
    return img, horizon


def _iou(box, boxes) -> np.ndarray:
    if not boxes:
        return np.zeros(0)
    b = np.asarray(boxes, np.float64)
    x1 = np.maximum(box[0], b[:, 0])
    y1 = np.maximum(box[1], b[:, 1])
    x2 = np.minimum(box[0] + box[2], b[:, 0] + b[:, 2])
    y2 = np.minimum(box[1] + box[3], b[:, 1] + b[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    return inter / (box[2] * box[3] + b[:, 2] * b[:, 3] - inter)


def _place(rng, opts: SynthOptions, look: Look, horizon: int, placed: List, edge: bool) -> Tuple[int, int, int, int]:
    """(x, y, w, h) of a new person: inside the image unless ``edge`` (then past top/left)."""
    H, W = opts.image_height, opts.image_width
    best, best_iou = None, np.inf
    lo, hi = opts.person_scale
    for attempt in range(30):
        shrink = 1.0 if attempt < 15 else 0.7
        h = int(round(rng.uniform(lo, hi) * H * shrink))
        h = max(16, min(h, H))
        w = max(6, min(W, int(round(h * look.width_ratio))))
        foot_lo = max(h, min(H, horizon + int(0.1 * H)))
        foot = int(rng.integers(foot_lo, H + 1)) if foot_lo < H else H
        x = int(rng.integers(0, W - w + 1))
        y = foot - h
        if edge:
            if rng.random() < 0.5:
                x = -int(rng.integers(1, max(2, w // 3)))
            else:
                y = -int(rng.integers(1, max(2, h // 5)))
        box = (x, y, w, h)
        iou = _iou(box, placed)
        worst = float(iou.max()) if len(iou) else 0.0
        if worst <= opts.max_overlap:
            return box
        if worst < best_iou:
            best, best_iou = box, worst
    return best


def _render_scene(rng, opts: SynthOptions, looks: Sequence[Look], edges: Sequence[bool], palette, patterns):
    """Draw one scene; returns (uint8 RGB image, list of (x, y, w, h)) in the order of ``looks``."""
    H, W = opts.image_height, opts.image_width
    img, horizon = _background(rng, opts, palette, patterns)
    boxes: List[Tuple[int, int, int, int]] = []
    for look, edge in zip(looks, edges):
        boxes.append(_place(rng, opts, look, horizon, boxes, edge))
    light = float(np.clip(rng.normal(1.0, 0.1), 0.75, 1.25))
    # farther people (feet higher up) first, so nearer ones occlude them
    for i in sorted(range(len(boxes)), key=lambda j: boxes[j][1] + boxes[j][3]):
        x, y, w, h = boxes[i]
        sprite, mask = _render_person(rng, looks[i], h, w, palette, light * rng.uniform(0.92, 1.08), patterns)
        x1, y1, x2, y2 = max(0, x), max(0, y), min(W, x + w), min(H, y + h)
        sub_m = mask[y1 - y : y2 - y, x1 - x : x2 - x]
        img[y1:y2, x1:x2][sub_m] = sprite[y1 - y : y2 - y, x1 - x : x2 - x][sub_m]
        if rng.random() < opts.occlusion:  # an object in front of the lower body
            oy1 = y + int(h * rng.uniform(0.55, 0.8))
            ox1 = x + int(w * rng.uniform(-0.3, 0.3))
            color, pattern = _clutter_look(rng, opts, palette, patterns)
            _fill_rect(img, ox1, oy1, ox1 + int(w * rng.uniform(0.7, 1.4)), y + h + 2, color, pattern, rng)
    if opts.noise > 0:
        img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(opts.noise)
    if opts.blur > 0:
        img = cv2.GaussianBlur(img, (0, 0), opts.blur)
    return np.clip(img, 0, 255).astype(np.uint8), boxes


def _write_jpeg(path: str, rgb: np.ndarray, quality: int) -> None:
    ok, buf = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {path}")
    with open(path, "wb") as f:
        f.write(buf.tobytes())


# --------------------------------------------------------------------------------------------
# identity -> image assignment


def _assign(rng, ids: Sequence[int], n_images: int, k_range, cap: int, cams: Optional[np.ndarray] = None) -> List[List[int]]:
    """Spread each identity over k distinct images (less loaded images preferred).

    With ``cams``, an identity seen k >= 2 times is seen by at least two cameras when possible.
    """
    per_image: List[List[int]] = [[] for _ in range(n_images)]
    load = np.zeros(n_images, np.int64)
    for pid in ids:
        k = int(min(rng.integers(k_range[0], k_range[1] + 1), n_images))
        cand = np.flatnonzero(load < cap)
        if len(cand) < k:
            cand = np.arange(n_images)
        p = 1.0 / (1.0 + load[cand]) ** 2
        chosen = rng.choice(cand, size=k, replace=False, p=p / p.sum())
        if cams is not None and k >= 2 and len(set(cams[chosen].tolist())) < 2:
            other = np.setdiff1d(cand[cams[cand] != cams[chosen[0]]], chosen)
            if len(other):
                chosen[-1] = rng.choice(other)
        for c in chosen:
            per_image[int(c)].append(pid)
            load[c] += 1
    return per_image


def _unlabeled_count(rng, opts: SynthOptions, n_labeled: int) -> int:
    n = int(rng.integers(opts.unlabeled[0], opts.unlabeled[1] + 1))
    n = max(0, min(n, opts.max_persons - n_labeled))
    return 1 if n + n_labeled == 0 else n


# --------------------------------------------------------------------------------------------
# .mat helpers: structures that loadmat returns as the released files


def _struct(rows: List[Dict], fields: Sequence[str], shape=None) -> np.ndarray:
    arr = np.empty(shape if shape is not None else (1, len(rows)), dtype=[(f, object) for f in fields])
    flat = arr.reshape(-1)
    for i, row in enumerate(rows):
        flat[i] = tuple(row[f] for f in fields)
    return arr


def _cell(values: Sequence, shape=None) -> np.ndarray:
    arr = np.empty(shape if shape is not None else (len(values), 1), dtype=object)
    flat = arr.reshape(-1)
    for i, v in enumerate(values):
        flat[i] = v
    return arr


def _num(v) -> np.ndarray:
    return np.array([[float(v)]])


def _loc(box) -> np.ndarray:
    return np.array([[float(v) for v in box]], dtype=np.float64)


def _savemat(path: str, variables: Dict) -> None:
    scipy.io.savemat(path, variables, do_compression=True)


# --------------------------------------------------------------------------------------------
# CUHK-SYSU


def generate_cuhk(root: str, seed: int = 0, verbose: bool = False, preset: str = "default", **options) -> Dict:
    """Write a synthetic CUHK-SYSU release into ``root``; returns a summary dict."""
    opts = make_options(preset, **options)
    # TestG50 defines the query split, so it is always written; a size larger than the pool
    # allows (every pool image but the query's own) is capped to what the pool holds
    sizes = sorted(set(int(v) for v in opts.gallery_sizes) | {50})
    written = {size: min(size, opts.test_images - 1) for size in sizes}
    t0 = time.time()
    rng = np.random.default_rng([int(seed), 1])
    palette = _palette(opts.num_colors)
    patterns = PATTERNS[: opts.num_patterns]
    n_train_ids, n_test_ids = opts.train_ids, opts.test_ids
    looks, free = _make_looks(rng, opts, n_train_ids + n_test_ids)

    n_img = opts.train_images + opts.test_images
    is_test = np.zeros(n_img, bool)
    is_test[rng.choice(n_img, opts.test_images, replace=False)] = True
    train_idx, test_idx = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    names = [f"s{i + 1}.jpg" for i in range(n_img)]
    train_people = _assign(rng, range(n_train_ids), len(train_idx), opts.train_appearances, opts.max_persons)
    test_people = _assign(rng, range(n_train_ids, n_train_ids + n_test_ids), len(test_idx), opts.test_appearances, opts.max_persons)
    people: List[List[int]] = [[] for _ in range(n_img)]
    for local, img in enumerate(train_idx):
        people[img] = train_people[local]
    for local, img in enumerate(test_idx):
        people[img] = test_people[local]

    img_dir = os.path.join(root, "Image", "SSM")
    ann_dir = os.path.join(root, "annotation")
    tt_dir = os.path.join(ann_dir, "test", "train_test")
    for d in (img_dir, tt_dir):
        os.makedirs(d, exist_ok=True)

    boxes_of: List[List[Tuple]] = []
    ids_of: List[List[int]] = []  # identity index, -1 unlabeled
    appearances: Dict[int, List[Tuple[int, Tuple]]] = {}
    for i in range(n_img):
        ids = list(people[i]) + [-1] * _unlabeled_count(rng, opts, len(people[i]))
        img_looks = [looks[j] if j >= 0 else _random_look(rng, free) for j in ids]
        rgb, boxes = _render_scene(rng, opts, img_looks, [False] * len(ids), palette, patterns)
        _write_jpeg(os.path.join(img_dir, names[i]), rgb, opts.jpeg_quality)
        boxes_of.append(boxes)
        ids_of.append(ids)
        for j, box in zip(ids, boxes):
            if j >= 0:
                appearances.setdefault(j, []).append((i, box))

    # Images.mat (zero-size boxes added to a few training images: the readers drop them)
    zero_imgs = set(rng.choice(train_idx, min(opts.zero_size_boxes, len(train_idx)), replace=False).tolist())
    img_rows = []
    for i in range(n_img):
        boxes = list(boxes_of[i])
        if i in zero_imgs:
            x, y = int(rng.integers(0, opts.image_width)), int(rng.integers(0, opts.image_height))
            boxes.insert(int(rng.integers(0, len(boxes) + 1)), (x, y, 0, 12) if rng.random() < 0.5 else (x, y, 9, 0))
        rows = [{"idlocate": _loc(b), "ishard": _num(rng.random() < 0.1)} for b in boxes]
        img_rows.append({"imname": names[i], "nAppear": _num(len(boxes)), "box": _struct(rows, ["idlocate", "ishard"])})
    _savemat(os.path.join(ann_dir, "Images.mat"), {"Img": _struct(img_rows, ["imname", "nAppear", "box"])})
    _savemat(os.path.join(ann_dir, "pool.mat"), {"pool": _cell([names[i] for i in test_idx])})

    # Train.mat: identity k (file order) -> pid k + 1
    train_cells = []
    for k in range(n_train_ids):
        scene = [{"imname": names[i], "idlocate": _loc(b), "ishard": _num(0)} for i, b in appearances.get(k, [])]
        train_cells.append(
            _struct([{"idname": f"p{k + 1:05d}", "nAppear": _num(len(scene)), "scene": _struct(scene, ["imname", "idlocate", "ishard"])}],
                    ["idname", "nAppear", "scene"], shape=(1, 1))
        )
    _savemat(os.path.join(tt_dir, "Train.mat"), {"Train": _cell(train_cells)})

    # TestG<N>.mat: query = one appearance; gallery = the other appearances first, then a fixed
    # random order of the images without the person (nested across sizes), never the query image
    queries = []
    for q in range(n_test_ids):
        apps = appearances.get(n_train_ids + q, [])
        if len(apps) < 2:
            raise RuntimeError(f"test identity {q} was placed in fewer than two images")
        qi = int(rng.integers(len(apps)))
        q_img, q_box = apps[qi]
        positives = [a for j, a in enumerate(apps) if j != qi]
        holding = {a[0] for a in apps}
        negatives = [int(i) for i in rng.permutation(test_idx) if int(i) not in holding]
        queries.append((q_img, q_box, positives, negatives))
    for size, cap in written.items():
        entries = []
        for q, (q_img, q_box, positives, negatives) in enumerate(queries):
            gallery = [{"imname": names[i], "idlocate": _loc(b), "ishard": _num(0)} for i, b in positives[:cap]]
            gallery += [{"imname": names[i], "idlocate": np.zeros((0, 0)), "ishard": _num(0)} for i in negatives[: cap - len(gallery)]]
            query = _struct([{"imname": names[q_img], "idlocate": _loc(q_box), "ishard": _num(0), "idname": f"p{n_train_ids + q + 1:05d}"}],
                            ["imname", "idlocate", "ishard", "idname"], shape=(1, 1))
            entries.append({"Query": query, "Gallery": _struct(gallery, ["imname", "idlocate", "ishard"])})
        var = f"TestG{size}"
        _savemat(os.path.join(tt_dir, f"{var}.mat"), {var: _struct(entries, ["Query", "Gallery"])})

    n_boxes = sum(len(b) for b in boxes_of)
    summary = {
        "dataset": "CUHK-SYSU",
        "root": str(root),
        "images": n_img,
        "train_images": len(train_idx),
        "gallery_images": len(test_idx),
        "boxes": n_boxes,
        "labeled_boxes": sum(len(a) for a in appearances.values()),
        "train_ids": n_train_ids,
        "queries": n_test_ids,
        "gallery_sizes": {f"TestG{k}": v for k, v in written.items()},
        "seconds": round(time.time() - t0, 2),
    }
    if verbose:
        print(_summary_line(summary))
    return summary


# --------------------------------------------------------------------------------------------
# PRW


def _prw_pids(n_train: int, n_test: int) -> Tuple[List[int], List[int]]:
    """Non-contiguous training pids like the release (a gap and one far id), disjoint test pids."""
    train = list(range(1, n_train + 1))
    if n_train >= 6:
        gap = n_train - 4
        far = max(932, n_train + n_test + 10)
        train = [p for p in train if p != gap][: n_train - 1] + [far]
    used = set(train)
    test, p = [], n_train + 2
    while len(test) < n_test:
        if p not in used:
            test.append(p)
        p += 1
    return train, test


def generate_prw(root: str, seed: int = 0, verbose: bool = False, preset: str = "default", **options) -> Dict:
    """Write a synthetic PRW release into ``root``; returns a summary dict."""
    opts = make_options(preset, **options)
    t0 = time.time()
    rng = np.random.default_rng([int(seed), 2])
    palette = _palette(opts.num_colors)
    patterns = PATTERNS[: opts.num_patterns]
    train_pids, test_pids = _prw_pids(opts.train_ids, opts.test_ids)
    looks, free = _make_looks(rng, opts, len(train_pids) + len(test_pids))
    look_of = dict(zip(train_pids + test_pids, looks))

    frames_dir = os.path.join(root, "frames")
    ann_dir = os.path.join(root, "annotations")
    os.makedirs(frames_dir, exist_ok=True)
    os.makedirs(ann_dir, exist_ok=True)

    def frame_names(n: int, start: int) -> Tuple[List[str], np.ndarray]:
        cams = rng.integers(1, opts.cameras + 1, n)
        cams[: min(n, opts.cameras)] = np.arange(1, min(n, opts.cameras) + 1)  # every camera used
        names = []
        for j, c in enumerate(cams):
            seq = 1 + (j % 3)
            names.append(f"c{c}s{seq}_{(start + j) * 25 + 1:06d}")
        return names, cams

    train_names, train_cams = frame_names(opts.train_images, 100)
    test_names, test_cams = frame_names(opts.test_images, 100 + opts.train_images)
    train_people = _assign(rng, train_pids, opts.train_images, opts.train_appearances, opts.max_persons, train_cams)
    test_people = _assign(rng, test_pids, opts.test_images, opts.test_appearances, opts.max_persons, test_cams)

    # queries: per test identity, appearances in distinct cameras, kept inside the frame
    query_slots: Dict[Tuple[int, int], bool] = {}
    apps_of: Dict[int, List[int]] = {}
    for i, pids in enumerate(test_people):
        for p in pids:
            apps_of.setdefault(p, []).append(i)
    for p in test_pids:
        seen_cams = set()
        for i in rng.permutation(apps_of.get(p, [])):
            if len(seen_cams) >= opts.queries_per_id:
                break
            if test_cams[i] not in seen_cams:
                seen_cams.add(test_cams[i])
                query_slots[(int(i), p)] = True

    key_choice = ["box_new"] * 8 + ["anno_file", "anno_previous"]
    key_count = {k: 0 for k in ("box_new", "anno_file", "anno_previous")}
    queries = []
    n_boxes = n_negative = 0

    def write_split(names, cams, people, is_test):
        nonlocal n_boxes, n_negative
        for i, name in enumerate(names):
            pids = list(people[i])
            pids += [-2] * _unlabeled_count(rng, opts, len(pids))
            img_looks = [look_of[p] if p > 0 else _random_look(rng, free) for p in pids]
            edges = [bool(not (is_test and (i, p) in query_slots) and rng.random() < opts.edge_prob) for p in pids]
            if not is_test and i == 0 and opts.edge_prob > 0:
                edges[0] = True  # at least one box with a negative coordinate
            rgb, boxes = _render_scene(rng, opts, img_looks, edges, palette, patterns)
            _write_jpeg(os.path.join(frames_dir, name + ".jpg"), rgb, opts.jpeg_quality)
            arr = np.array([[p, *b] for p, b in zip(pids, boxes)], dtype=np.float64).reshape(-1, 5)
            n_boxes += len(arr)
            n_negative += int((arr[:, 1:3] < 0).any(axis=1).sum())
            # make sure each key is used at least once, the rest mostly box_new
            missing = [k for k, c in key_count.items() if c == 0]
            key = missing[0] if missing and rng.random() < 0.3 else key_choice[int(rng.integers(len(key_choice)))]
            key_count[key] += 1
            variables = {key: arr}
            if key == "box_new" and rng.random() < 0.1:
                # an older annotation beside the current one: readers must prefer box_new
                stale = arr.copy()
                stale[:, 1:3] += 3
                variables["anno_previous"] = stale
            _savemat(os.path.join(ann_dir, name + ".jpg.mat"), variables)
            if is_test:
                for p, b in zip(pids, boxes):
                    if (i, p) in query_slots:
                        queries.append((p, b, name))

    write_split(train_names, train_cams, train_people, False)
    write_split(test_names, test_cams, test_people, True)

    _savemat(os.path.join(root, "frame_train.mat"), {"img_index_train": _cell(train_names)})
    _savemat(os.path.join(root, "frame_test.mat"), {"img_index_test": _cell(test_names)})
    queries.sort(key=lambda q: (q[0], q[2]))
    lines = []
    for n, (p, (x, y, w, h), name) in enumerate(queries):
        if n % 3 == 1:  # some lines with float coordinates
            lines.append(f"{p} {x:.1f} {y:.1f} {w:.1f} {h:.1f} {name}")
        else:
            lines.append(f"{p} {x} {y} {w} {h} {name}")
    with open(os.path.join(root, "query_info.txt"), "wb") as f:
        f.write(("\r\n".join(lines) + "\r\n").encode("ascii"))

    summary = {
        "dataset": "PRW",
        "root": str(root),
        "images": len(train_names) + len(test_names),
        "train_images": len(train_names),
        "gallery_images": len(test_names),
        "boxes": n_boxes,
        "train_ids": len(train_pids),
        "test_ids": len(test_pids),
        "queries": len(queries),
        "cameras": opts.cameras,
        "negative_coordinate_boxes": n_negative,
        "annotation_keys": key_count,
        "seconds": round(time.time() - t0, 2),
    }
    if verbose:
        print(_summary_line(summary))
    return summary


# --------------------------------------------------------------------------------------------


def _summary_line(s: Dict) -> str:
    parts = [f"{k}={v}" for k, v in s.items() if k not in ("dataset", "root")]
    return f"{s['dataset']:9s} -> {s['root']}: " + ", ".join(parts)


def generate(
    out_dir: str,
    seed: int = 0,
    datasets: Sequence[str] = ("CUHK-SYSU", "PRW"),
    verbose: bool = False,
    preset: str = "default",
    cuhk: Optional[Dict] = None,
    prw: Optional[Dict] = None,
    **options,
) -> Dict[str, Dict]:
    """Write ``out_dir/CUHK-SYSU`` and ``out_dir/PRW``; returns {dataset: summary}.

    ``options`` apply to both datasets; ``cuhk`` / ``prw`` hold per-dataset overrides.
    """
    out = {}
    for name in datasets:
        if name == "CUHK-SYSU":
            out[name] = generate_cuhk(os.path.join(out_dir, name), seed, verbose, preset, **{**options, **(cuhk or {})})
        elif name == "PRW":
            out[name] = generate_prw(os.path.join(out_dir, name), seed, verbose, preset, **{**options, **(prw or {})})
        else:
            raise ValueError(f"unknown dataset {name!r}: expected 'CUHK-SYSU' or 'PRW'")
    return out


def _parser() -> argparse.ArgumentParser:
    # each option's default is stated once, in its help (the size options default to the preset's)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="data/synthetic", help="output folder, CUHK-SYSU/ and PRW/ inside (%(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="the world is a function of the seed and the sizes (%(default)s)")
    ap.add_argument("--datasets", nargs="+", default=["CUHK-SYSU", "PRW"], choices=["CUHK-SYSU", "PRW"],
                    help="layouts to write (both)")
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS), help="sizes and difficulty (%(default)s)")
    ap.add_argument("--quiet", action="store_true", help="print nothing")
    for f in dataclasses.fields(SynthOptions):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, tuple):
            ap.add_argument(flag, type=type(default[0]), nargs="+" if f.name == "gallery_sizes" else len(default),
                            default=None, help=f"{f.name} (default {' '.join(map(str, default))})")
        else:
            ap.add_argument(flag, type=type(default), default=None, help=f"{f.name} (default {default})")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    options = {}
    for f in dataclasses.fields(SynthOptions):
        v = getattr(args, f.name)
        if v is not None:
            options[f.name] = tuple(v) if isinstance(v, list) else v
    t0 = time.time()
    generate(args.out, args.seed, datasets=args.datasets, verbose=not args.quiet, preset=args.preset, **options)
    if not args.quiet:
        print(f"synthetic world (seed {args.seed}, preset {args.preset}) written to {args.out} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
