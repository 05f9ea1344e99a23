"""Helpers to read MATLAB v5 files as ``scipy.io.loadmat`` returns them (default options).

With the default options loadmat returns:

- a MATLAB struct array as a numpy structured array (fields by name, shape (1, N) or (N, 1));
- a cell array as an object array whose elements are the cells' contents;
- a string as a 1-element unicode array (``array(['s1.jpg'])``);
- a number as a 2-D array (``array([[3.]])``); an empty value as an array of size 0.

The helpers below access struct fields by name, flatten (1, N) and (N, 1) shapes alike and raise
a :class:`~datasets.base.DatasetError` naming the file and what was expected when the content
does not have the expected form.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Callable, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import scipy.io

from .base import DatasetError, DatasetFileNotFoundError

__all__ = [
    "load_mat",
    "mat_string",
    "mat_strings",
    "iter_records",
    "record_field",
    "check_fields",
    "xywh_rows",
    "cached_parse",
    "clear_cache",
]


def load_mat(path: str, keys: Sequence[str] = (), any_of: Sequence[str] = ()) -> dict:
    """Load a .mat file with scipy's default options.

    ``keys``: variables that must all be present; ``any_of``: at least one of them must be.
    Raises DatasetFileNotFoundError when the file is missing and DatasetError when it cannot be
    parsed or a variable is missing (the message names the file, the variable and the keys found).
    """
    path = str(path)
    if not os.path.isfile(path):
        raise DatasetFileNotFoundError(f"missing annotation file: {path}")
    try:
        data = scipy.io.loadmat(path)
    except Exception as exc:  # scipy raises several types for corrupt files
        raise DatasetError(f"cannot read MATLAB file {path}: {exc}") from exc
    found = sorted(k for k in data if not k.startswith("__"))
    for key in keys:
        if key not in data:
            raise DatasetError(
                f"{path}: variable '{key}' not found (variables in the file: {found})"
            )
    if any_of and not any(k in data for k in any_of):
        raise DatasetError(
            f"{path}: none of the variables {list(any_of)} found (variables in the file: {found})"
        )
    return data


def _unwrap(value):
    """Strip 1-element object-array wrappers (cells holding one value)."""
    while isinstance(value, np.ndarray) and value.dtype == object and value.size == 1:
        value = value.ravel()[0]
    return value


def mat_string(value, where: str = "") -> str:
    """Return the string held by a loadmat value (``array(['s1.jpg'])``, a str, a cell...)."""
    value = _unwrap(value)
    if isinstance(value, (str, np.str_)):
        return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.dtype.kind in "US":
        if value.size == 0:
            return ""
        if value.size == 1:
            item = value.ravel()[0]
            return item.decode("utf-8") if isinstance(item, bytes) else str(item)
        if value.ndim == 1 or 1 in value.shape:
            # a char array kept as single characters
            flat = value.ravel()
            if all(len(str(c)) <= 1 for c in flat):
                return "".join(str(c) for c in flat)
    raise DatasetError(f"{where}: expected a string, got {type(value).__name__} {_describe(value)}")


def mat_strings(value, where: str = "") -> List[str]:
    """Strings of a cell array (any shape, flattened in memory order)."""
    if not isinstance(value, np.ndarray):
        return [mat_string(value, where)]
    if value.dtype.kind in "US":
        # a char matrix of several rows comes back as one string per row
        return [str(v).strip() for v in value.ravel()] if value.size > 1 else [mat_string(value, where)]
    return [mat_string(v, f"{where}[{i}]") for i, v in enumerate(value.ravel())]


def _describe(value) -> str:
    if isinstance(value, np.ndarray):
        return f"(array of shape {value.shape}, dtype {value.dtype})"
    return f"({value!r})"[:80]


def iter_records(value, where: str = "") -> Iterator[np.void]:
    """Yield the records of a struct array, or of a cell array of structs, in memory order."""
    if isinstance(value, np.void) and value.dtype.names:
        yield value
    elif isinstance(value, np.ndarray) and value.dtype.names:
        yield from value.ravel()
    elif isinstance(value, np.ndarray) and value.dtype == object:
        for i, cell in enumerate(value.ravel()):
            yield from iter_records(cell, f"{where}[{i}]")
    elif isinstance(value, np.ndarray) and value.size == 0:
        return
    else:
        raise DatasetError(f"{where}: expected a struct array, got {_describe(value)}")


def records(value, where: str = "") -> List[np.void]:
    return list(iter_records(value, where))


def check_fields(value, fields: Iterable[str], where: str) -> None:
    """Check that a struct array (or record) has the named fields."""
    value = _unwrap(value)
    names = getattr(getattr(value, "dtype", None), "names", None)
    if names is None:
        raise DatasetError(
            f"{where}: expected a struct with fields {list(fields)}, got {_describe(value)}"
        )
    missing = [f for f in fields if f not in names]
    if missing:
        raise DatasetError(
            f"{where}: struct field(s) {missing} not found (fields present: {list(names)})"
        )


def record_field(rec, name: str, where: str):
    """Field ``name`` of a record (np.void) or of a 1-element struct array."""
    rec = _unwrap(rec)
    if isinstance(rec, np.ndarray) and rec.dtype.names and rec.size == 1:
        rec = rec.ravel()[0]
    names = getattr(getattr(rec, "dtype", None), "names", None)
    if not names:
        raise DatasetError(f"{where}: expected a struct with field '{name}', got {_describe(rec)}")
    if name not in names:
        raise DatasetError(
            f"{where}: struct field '{name}' not found (fields present: {list(names)})"
        )
    return rec[name]


def xywh_rows(
    values: Sequence,
    where: str,
    allow_empty: bool = False,
    describe: Optional[Callable[[int], str]] = None,
) -> tuple:
    """Stack 1x4 (x, y, w, h) arrays into a float64 (n, 4) matrix.

    Returns ``(boxes, present)``: ``present`` is a bool (n,) mask, False for empty entries (only
    allowed when ``allow_empty``; their rows are NaN). Raises DatasetError naming the first
    malformed entry (``describe(i)`` names entry i, default ``where[i]``).
    """
    flat = [np.asarray(_unwrap(v), dtype=np.float64).ravel() for v in values]
    sizes = np.fromiter((f.size for f in flat), dtype=np.int64, count=len(flat))
    bad = np.flatnonzero((sizes != 4) & ~((sizes == 0) & allow_empty))
    if bad.size:
        i = int(bad[0])
        expected = "4 values (x, y, w, h)" + (" or an empty array" if allow_empty else "")
        name = describe(i) if describe is not None else f"{where}[{i}]"
        raise DatasetError(f"{name}: malformed idlocate, expected {expected}, got {sizes[i]} value(s)")
    present = sizes == 4
    out = np.full((len(flat), 4), np.nan, dtype=np.float64)
    if present.any():
        out[present] = np.concatenate([f for f in flat if f.size == 4]).reshape(-1, 4)
    if not np.isfinite(out[present]).all():
        i = int(np.flatnonzero(present)[~np.isfinite(out[present]).all(axis=1)][0])
        name = describe(i) if describe is not None else f"{where}[{i}]"
        raise DatasetError(f"{name}: idlocate holds non-finite values {out[i].tolist()}")
    return out, present


_PARSE_CACHE: "OrderedDict[tuple, object]" = OrderedDict()
_PARSE_CACHE_SIZE = 16


def cached_parse(path: str, parser: Callable[[str], object], cache_dir: Optional[str] = None,
                 result_type=None, sources: Sequence[str] = (), name: Optional[str] = None):
    """``parser(path)``, memoised in this process and on disk (``datasets.parse_cache``).

    Several splits read the same large files (Images.mat, TestG50.mat) and every evaluation reads
    them again: the parsed result is kept in memory on (parser, absolute path, mtime, size, and
    the same of ``sources``, other files the parser reads) and in the disk cache under
    ``cache_dir``. ``result_type``: the dataclass the parser returns (None: a list of strings).
    The result is treated as read-only by its users.
    """
    from .parse_cache import load_or_parse, resolve_cache_dir, source_stamp

    path = str(path)
    if not os.path.isfile(path):
        raise DatasetFileNotFoundError(f"missing annotation file: {path}")
    name = name or getattr(parser, "__qualname__", repr(parser))
    files = [path, *sources]
    if not all(os.path.isfile(f) for f in sources):
        return parser(path)  # the parser names the missing file
    # the folder is part of the key: a result memoised for one folder is still written to another
    key = (name, resolve_cache_dir(cache_dir), tuple(tuple(s) for s in source_stamp(files)))
    if key in _PARSE_CACHE:
        _PARSE_CACHE.move_to_end(key)
        return _PARSE_CACHE[key]
    value = load_or_parse(files, lambda: parser(path), name, cache_dir=cache_dir, result_type=result_type)
    _PARSE_CACHE[key] = value
    while len(_PARSE_CACHE) > _PARSE_CACHE_SIZE:
        _PARSE_CACHE.popitem(last=False)
    return value


def clear_cache() -> None:
    """Forget the parse results held in memory (the disk cache stays)."""
    _PARSE_CACHE.clear()
