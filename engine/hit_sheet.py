"""A picture of a search's hits: the query person, then each hit's crop with its rank,
similarity and source (file, and frame and time for a video)."""
from __future__ import annotations

import os
from collections import defaultdict
from typing import List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from engine.index_search import Hit
from engine.indexing import SourceError, read_frames
from utils.drawing import font_for, legend_strip
from utils.fileio import atomic_write

__all__ = ["draw_hit_sheet"]

QUERY, HIT, SAME, OTHER, MISSING = (255, 200, 0), (90, 90, 90), (0, 170, 0), (220, 40, 40), (200, 200, 200)
CONTEXT = 0.15  # crops reach this fraction of the box's size beyond it on every side


def _crop(rgb: np.ndarray, box: Sequence[float]) -> Image.Image:
    height, width = rgb.shape[:2]
    x1, y1, x2, y2 = (float(v) for v in box)
    dx, dy = CONTEXT * (x2 - x1), CONTEXT * (y2 - y1)
    left, top = int(max(0, np.floor(x1 - dx))), int(max(0, np.floor(y1 - dy)))
    right, bottom = int(min(width, np.ceil(x2 + dx))), int(min(height, np.ceil(y2 + dy)))
    crop = Image.fromarray(rgb[top:max(bottom, top + 1), left:max(right, left + 1)])
    ImageDraw.Draw(crop).rectangle([x1 - left, y1 - top, x2 - left, y2 - top], outline=(255, 255, 255), width=1)
    return crop


def _tile(crop: Optional[Image.Image], lines: List[str], colour, size, font) -> Image.Image:
    width, height = size
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = probe.textbbox((0, 0), "Ag", font=font)[3] + 3
    tile = Image.new("RGB", (width, height + line_height * len(lines) + 6), (255, 255, 255))
    draw = ImageDraw.Draw(tile)
    if crop is not None:
        scale = min((width - 8) / crop.width, (height - 8) / crop.height)
        crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))), Image.BILINEAR)
        tile.paste(crop, ((width - crop.width) // 2, (height - crop.height) // 2))
    else:
        draw.text((8, height // 2), "source not readable", fill=(0, 0, 0), font=font)
    draw.rectangle([1, 1, width - 2, height - 2], outline=colour, width=4)
    for i, line in enumerate(lines):
        draw.text((4, height + 3 + i * line_height), line, fill=(0, 0, 0), font=font)
    return tile


def _source_label(hit: Hit, max_chars: int) -> List[str]:
    name = os.path.basename(hit.source)
    if len(name) > max_chars:
        name = "..." + name[-(max_chars - 3):]
    if hit.kind == "video":
        when = f"frame {hit.frame}" + (f", {hit.time:.2f} s" if hit.time is not None else "")
        return [name, when]
    return [name]


def draw_hit_sheet(query_rgb: np.ndarray, query_box: Sequence[float], hits: List[Hit], out_path: str,
                   marks: Optional[List[Optional[bool]]] = None, columns: int = 6, tile_size=(150, 260),
                   notes: Sequence[str] = ()) -> str:
    """Write the sheet to ``out_path`` and return it. ``marks`` (one per hit, optional): True
    for a hit known to be the query's identity, False for one known not to be (drawn green and
    red), None where unknown."""
    marks = marks or [None] * len(hits)
    font = font_for(tile_size[1] + 60)
    wanted = defaultdict(set)
    for hit in hits:
        wanted[(hit.source, hit.kind)].add(hit.frame)
    frames = {}
    for (path, kind), numbers in wanted.items():
        try:
            for number, rgb in read_frames(path, kind, sorted(numbers)).items():
                frames[(path, number)] = rgb
        except (SourceError, OSError):
            pass  # moved or deleted since it was indexed: the tile says so
    chars = max(8, tile_size[0] // 7)
    tiles = [_tile(_crop(query_rgb, query_box), ["query"], QUERY, tile_size, font)]
    for hit, mark in zip(hits, marks):
        rgb = frames.get((hit.source, hit.frame))
        colour = HIT if mark is None else SAME if mark else OTHER
        if rgb is None:
            colour = MISSING
        label = [f"#{hit.rank}  {hit.similarity:.3f}"] + _source_label(hit, chars)
        tiles.append(_tile(None if rgb is None else _crop(rgb, hit.box), label, colour, tile_size, font))
    rows = [tiles[i:i + columns] for i in range(0, len(tiles), columns)]
    gap = 6
    tile_w, tile_h = tiles[0].width, max(t.height for t in tiles)
    width = columns * tile_w + (columns - 1) * gap if len(tiles) > columns else sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    entries = [(QUERY, "query"), (HIT, "hit: rank, similarity to the query, source")]
    if any(m is not None for m in marks):
        entries += [(SAME, "hit of the query's identity (ground truth)"), (OTHER, "hit of another identity")]
    legend = legend_strip(width, entries, list(notes), font)
    sheet = Image.new("RGB", (width, len(rows) * (tile_h + gap) + legend.height), (255, 255, 255))
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            sheet.paste(tile, (c * (tile_w + gap), r * (tile_h + gap)))
    sheet.paste(legend, (0, len(rows) * (tile_h + gap)))
    image_format = Image.registered_extensions().get(os.path.splitext(out_path)[1].lower(), "JPEG")
    return atomic_write(out_path, lambda f: sheet.save(f, format=image_format, quality=92))
