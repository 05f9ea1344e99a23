"""On-disk cache of parsed annotation files.

At full scale, reading the release's files is what a dataset build waits for: Images.mat holds
18,184 image structs, TestG100.mat 2,900 x 100 gallery structs, PRW one small .mat per frame.
A parse result is written once to a cache folder and read back by later builds, in any process,
as long as its source files are unchanged.

- Folder: the ``cache_dir`` a dataset is built with (the config's INPUT.ANNOTATION_CACHE_DIR),
  else the environment variable ``DDPS_CACHE_DIR``, else ``$XDG_CACHE_HOME/ddps/annotations``
  (``~/.cache/ddps/annotations``). ``"none"`` turns the disk cache off.
- Validity: an entry records its parser, every source file's absolute path, size, modification
  time (ns) and inode, and a digest of the reader code. An entry that differs in any of these
  (a file edited or replaced, a new version of the readers) is stale: it is parsed again and
  replaced. An entry that cannot be read is parsed again too (with a warning), never trusted.
- Format: NumPy ``.npz`` read with ``allow_pickle=False`` (arrays and one JSON header): loading an
  entry can never execute code, whoever wrote the folder. One entry per (parser, first source
  file): the folder does not grow when files change.

What can be cached: a dataclass whose init fields are numpy arrays, lists of strings, strings or
numbers (other fields are derived in ``__post_init__``), or a list of strings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import warnings
from typing import Callable, Optional, Sequence

import numpy as np

from utils.misc import atomic_write_bytes

__all__ = ["FORMAT_VERSION", "default_cache_dir", "resolve_cache_dir", "load_or_parse", "source_stamp"]

FORMAT_VERSION = 1
ENV_VAR = "DDPS_CACHE_DIR"
DISABLED = ("none", "off", "false", "0")
# the reader modules: a change in any of them invalidates every entry
_READER_FILES = ("base.py", "matfile.py", "cuhk_sysu.py", "prw.py", "parse_cache.py")
_reader_digest: Optional[str] = None


class ParseCacheWarning(UserWarning):
    """A cache entry could not be read or written; the files are parsed (or used) directly."""


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ddps", "annotations")


def resolve_cache_dir(cache_dir: Optional[str] = None) -> Optional[str]:
    """The folder to use (None: caching off) for a dataset built with ``cache_dir``."""
    value = cache_dir if cache_dir else os.environ.get(ENV_VAR, "")
    if not value:
        return default_cache_dir()
    if str(value).strip().lower() in DISABLED:
        return None
    return os.path.abspath(os.path.expanduser(str(value)))


def reader_digest() -> str:
    global _reader_digest
    if _reader_digest is None:
        here = os.path.dirname(os.path.abspath(__file__))
        digest = hashlib.sha256()
        for name in _READER_FILES:
            with open(os.path.join(here, name), "rb") as f:
                digest.update(f.read())
        _reader_digest = digest.hexdigest()
    return _reader_digest


def source_stamp(paths: Sequence[str]) -> list:
    """[[absolute path, size, mtime_ns, inode], ...]: what identifies the content of the sources."""
    stamp = []
    for path in paths:
        st = os.stat(path)
        stamp.append([os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino])
    return stamp


def _entry_path(folder: str, parser_name: str, first_source: str) -> str:
    name = hashlib.sha256(f"{parser_name}\0{os.path.abspath(first_source)}".encode()).hexdigest()[:32]
    return os.path.join(folder, f"{name}.npz")


# --------------------------------------------------------------------------------------------
# encoding: a dataclass (or a list of strings) <-> arrays + a JSON header


def _encode(value) -> tuple:
    arrays, fields = {}, {}
    if isinstance(value, list):
        arrays["v:items"] = np.asarray(value, dtype=str)
        return arrays, {"kind": "list"}
    if not dataclasses.is_dataclass(value):
        raise TypeError(f"cannot cache a {type(value).__name__}")
    for f in dataclasses.fields(value):
        if not f.init:
            continue
        v = getattr(value, f.name)
        if isinstance(v, np.ndarray):
            if v.dtype.kind == "O":
                raise TypeError(f"cannot cache the object array {f.name}")
            arrays[f"v:{f.name}"] = v
            fields[f.name] = "array"
        elif isinstance(v, list) and all(isinstance(s, str) for s in v):
            arrays[f"v:{f.name}"] = np.asarray(v, dtype=str)
            fields[f.name] = "strings"
        elif isinstance(v, (str, int, float, bool)) or v is None:
            fields[f.name] = ["scalar", v]
        else:
            raise TypeError(f"cannot cache the field {f.name} ({type(v).__name__})")
    return arrays, {"kind": "dataclass", "type": type(value).__qualname__, "fields": fields}


def _decode(arrays, layout, result_type):
    if layout["kind"] == "list":
        return arrays["v:items"].tolist()
    if result_type is None or layout.get("type") != result_type.__qualname__:
        raise ValueError(f"entry holds a {layout.get('type')}, expected {getattr(result_type, '__qualname__', None)}")
    kwargs = {}
    for name, kind in layout["fields"].items():
        if kind == "array":
            kwargs[name] = arrays[f"v:{name}"]
        elif kind == "strings":
            kwargs[name] = arrays[f"v:{name}"].tolist()
        else:
            kwargs[name] = kind[1]
    return result_type(**kwargs)


def _header(parser_name: str, sources: Sequence[str]) -> dict:
    stamp = source_stamp(sources)
    # thousands of sources (PRW's annotation files, a split's images) are kept as one digest
    digest = hashlib.sha256(json.dumps(stamp).encode()).hexdigest()
    return {"format": FORMAT_VERSION, "parser": parser_name, "readers": reader_digest(),
            "first_source": stamp[0], "num_sources": len(stamp), "sources_sha256": digest}


def _read_entry(path: str, expected: dict, result_type):
    """The cached value, or None when the entry is absent or stale; raises when it is unreadable."""
    if not os.path.isfile(path):
        return None
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(bytes(data["header"]).decode())
        if meta.get("key") != expected:
            return None
        arrays = {k: data[k] for k in data.files if k.startswith("v:")}
    return _decode(arrays, meta["layout"], result_type)


def _write_entry(path: str, key: dict, value) -> None:
    arrays, layout = _encode(value)
    header = json.dumps({"key": key, "layout": layout}).encode()
    buffer = io.BytesIO()
    np.savez(buffer, header=np.frombuffer(header, dtype=np.uint8), **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_or_parse(sources: Sequence[str], parser: Callable[[], object], parser_name: str,
                  cache_dir: Optional[str] = None, result_type=None):
    """``parser()``, or its result saved on disk by an earlier call on the same, unchanged
    ``sources`` (the files it reads; the first names the entry). ``result_type``: the dataclass
    the parser returns (None for a list of strings)."""
    folder = resolve_cache_dir(cache_dir)
    if folder is None or not sources:
        return parser()
    key = _header(parser_name, sources)
    path = _entry_path(folder, parser_name, sources[0])
    try:
        value = _read_entry(path, key, result_type)
    except Exception as exc:  # truncated, not an npz, a foreign layout: parse again
        warnings.warn(f"ignoring the unreadable annotation cache entry {path} ({type(exc).__name__}: {exc}); "
                      f"parsing {sources[0]} again", ParseCacheWarning, stacklevel=3)
        value = None
    if value is not None:
        return value
    value = parser()
    try:
        _write_entry(path, key, value)
    except OSError as exc:  # a read-only or full cache folder only costs the next build a parse
        warnings.warn(f"cannot write the annotation cache entry {path}: {exc}", ParseCacheWarning, stacklevel=3)
    return value
