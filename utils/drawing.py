"""Readable annotations on pictures: labels on a filled background, font sized to the picture,
and a legend strip. Used by the demo."""
from __future__ import annotations

from typing import List, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

Colour = Tuple[int, int, int]

__all__ = ["draw_box", "font_for", "legend_strip", "side_by_side"]


def font_for(height: int) -> ImageFont.ImageFont:
    """A font about 1/28 of the picture's height, at least 10 px (Pillow's scalable default)."""
    return ImageFont.load_default(size=max(10, height // 28))


def _text_colour(background: Colour) -> Colour:
    luminance = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def draw_box(draw: ImageDraw.ImageDraw, box: Sequence[float], colour: Colour, width: int, label: str = "",
             font=None) -> None:
    """An outlined box and, above its top-left corner (inside the picture), its label on a
    filled background in the box's colour."""
    x1, y1, x2, y2 = (float(v) for v in box)
    draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
    if not label:
        return
    left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
    w, h = right - left + 4, bottom - top + 2
    y = y1 - h if y1 - h >= 0 else y1 + width
    draw.rectangle([x1, y, x1 + w, y + h], fill=colour)
    draw.text((x1 + 2 - left, y + 1 - top), label, fill=_text_colour(colour), font=font)


def legend_strip(width: int, entries: Sequence[Tuple[Colour, str]], lines: Sequence[str] = (), font=None) -> Image.Image:
    """A white strip ``width`` wide: one row per (colour swatch, text) entry, then plain lines."""
    font = font or font_for(360)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    row = probe.textbbox((0, 0), "Ag", font=font)[3] + 6
    rows: List[Tuple[object, str]] = [(c, t) for c, t in entries] + [(None, t) for t in lines]
    strip = Image.new("RGB", (width, row * len(rows) + 8), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, (colour, text) in enumerate(rows):
        y = 4 + i * row
        x = 6
        if colour is not None:
            draw.rectangle([x, y + 2, x + row - 6, y + row - 4], fill=colour)
            x += row + 2
        draw.text((x, y), text, fill=(0, 0, 0), font=font)
    return strip


def side_by_side(tiles: Sequence[Image.Image], gap: int = 8, below: Image.Image = None) -> Image.Image:
    """The tiles left to right, ``gap`` pixels apart on white, and ``below`` under them."""
    height = max(t.height for t in tiles)
    width = sum(t.width for t in tiles) + gap * (len(tiles) - 1)
    extra = below.height if below is not None else 0
    panel = Image.new("RGB", (width, height + extra), (255, 255, 255))
    x = 0
    for tile in tiles:
        panel.paste(tile, (x, 0))
        x += tile.width + gap
    if below is not None:
        panel.paste(below, (0, height))
    return panel
