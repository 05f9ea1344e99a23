"""Checks of boxes a user gives on the command line."""
from typing import Optional, Sequence

import numpy as np

__all__ = ["box_outside_image"]


def box_outside_image(box: Sequence[float], width: int, height: int, flag: str, path: str) -> Optional[str]:
    """Why ``box`` (x1 y1 x2 y2, pixels) cannot be a person box in a ``width`` x ``height``
    picture (not finite, empty, or outside it), or None when it can."""
    values = [float(v) for v in box]
    if len(values) != 4:
        return f"{flag} takes 4 numbers X1 Y1 X2 Y2, got {len(values)}"
    x1, y1, x2, y2 = values
    if all(np.isfinite(values)) and 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height:
        return None
    return (f"{flag} {' '.join(f'{v:g}' for v in values)} does not fit the query image {path} "
            f"({width} x {height}): expected 0 <= X1 < X2 <= {width} and 0 <= Y1 < Y2 <= {height}")
