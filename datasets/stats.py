"""Dataset statistics and a plain-text table of them."""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from .base import UNLABELED_PID

__all__ = ["dataset_statistics", "format_statistics_table"]


def dataset_statistics(dataset) -> Dict:
    """Counts of one dataset split.

    Keys: ``name``, ``split``, ``images``, ``boxes``, ``labeled_boxes``, ``unlabeled_boxes``,
    ``identities`` (distinct labeled pids), ``cameras`` (distinct camera ids, PRW only, else
    None), ``box_width`` and ``box_height`` ((min, max) in pixels, None without boxes).
    """
    annos = dataset.annotations
    boxes = np.concatenate([np.asarray(a["boxes"]).reshape(-1, 4) for a in annos]) if annos else np.zeros((0, 4))
    pids = np.concatenate([np.asarray(a["pids"]).reshape(-1) for a in annos]) if annos else np.zeros(0)
    labeled = pids != UNLABELED_PID
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    cams = sorted({int(a["cam_id"]) for a in annos if "cam_id" in a})
    return {
        "name": getattr(dataset, "name", ""),
        "split": getattr(dataset, "split", ""),
        "images": len(annos),
        "boxes": int(len(boxes)),
        "labeled_boxes": int(labeled.sum()),
        "unlabeled_boxes": int((~labeled).sum()),
        "identities": int(len(np.unique(pids[labeled]))),
        "cameras": len(cams) if cams else None,
        "box_width": (int(widths.min()), int(widths.max())) if len(boxes) else None,
        "box_height": (int(heights.min()), int(heights.max())) if len(boxes) else None,
    }


_COLUMNS = [
    ("dataset", "name"),
    ("split", "split"),
    ("images", "images"),
    ("boxes", "boxes"),
    ("labeled", "labeled_boxes"),
    ("unlabeled", "unlabeled_boxes"),
    ("ids", "identities"),
    ("cams", "cameras"),
    ("box w", "box_width"),
    ("box h", "box_height"),
]


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple):
        return f"{value[0]}-{value[1]}"
    return str(value)


def format_statistics_table(datasets: Sequence) -> str:
    """A plain-text table, one row per dataset (or per statistics dict)."""
    stats: List[Dict] = [d if isinstance(d, dict) else dataset_statistics(d) for d in datasets]
    rows = [[title for title, _ in _COLUMNS]]
    rows += [[_cell(s.get(key)) for _, key in _COLUMNS] for s in stats]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]

    def line(row):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(rows[0]), sep] + [line(r) for r in rows[1:]])
