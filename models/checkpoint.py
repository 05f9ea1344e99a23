"""Loading model weights from the original's checkpoints and ours (SPEC 4.4), and atomic saving.

Accepted inputs of ``load_model_weights``:
- a file path (``torch.load`` on CPU) or an already loaded object;
- the single-model layout ``{"model": state_dict, "optimizer": ..., ...}``;
- the distillation layout ``{"model": {"student": state_dict, "fgd": {...}}, ...}`` (the student);
- a bare state dict;
- key names of torchvision 0.12 (the released files): ``backbone.fpn.inner_blocks.N.{weight,bias}``
  -> ``backbone.fpn.inner_blocks.N.0.{weight,bias}`` (same for ``layer_blocks``) and
  ``rpn.head.conv.{weight,bias}`` -> ``rpn.head.conv.0.0.{weight,bias}``, mapped by these rules
  (not by torchvision's version-metadata hooks); a ``module.`` prefix (DataParallel) is removed.

Loading is strict: missing, unexpected and shape-mismatched keys raise ``CheckpointMismatchError``
listing them. Two tolerated differences, both announced with a warning:
- ``roi_heads.reid_loss.header_cq`` missing (the original kept the OIM queue head out of the state
  dict): set to 0;
- ``num_batches_tracked`` counters in the file for modules that are ``FrozenBatchNorm2d`` in the
  model (a checkpoint trained with BatchNorm loaded with FROZENBN2d True; torch drops them too).
"""

from __future__ import annotations

import collections
import os
import pickle
import re
import warnings
from collections import OrderedDict
from typing import Iterable, List, Mapping, Sequence, Tuple, Union

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from utils.errors import UserError
from utils.fileio import atomic_write

__all__ = [
    "CheckpointFileError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "UnsafeCheckpointError",
    "extract_model_state",
    "load_checkpoint_file",
    "load_model_weights",
    "rename_legacy_keys",
    "save_checkpoint",
]

HEADER_CQ_KEY = "roi_heads.reid_loss.header_cq"

_LEGACY_RULES = [
    (re.compile(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$"), r"\1.0.\2"),
    (re.compile(r"^(rpn\.head\.conv)\.(weight|bias)$"), r"\1.0.0.\2"),
]


class CheckpointMismatchError(UserError, RuntimeError):
    """The checkpoint's state dict does not fit the model. ``missing``, ``unexpected`` and
    ``mismatched`` (shape) hold the offending key names."""

    def __init__(self, message: str, missing: Sequence[str] = (),
                 unexpected: Sequence[str] = (), mismatched: Sequence[str] = ()):
        super().__init__(message)
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.mismatched = list(mismatched)

    def only_under(self, prefix: str) -> bool:
        """True when there are offending keys and all of them start with ``prefix``."""
        keys = self.missing + self.unexpected + self.mismatched
        return bool(keys) and all(k.startswith(prefix) for k in keys)


# What a checkpoint may hold besides tensors and plain containers: the original release saved its
# MultiStepLR state, whose milestones are a collections.Counter (a dict).
_SAFE_GLOBALS = [collections.Counter]


class UnsafeCheckpointError(UserError, pickle.UnpicklingError):
    """A checkpoint file holds Python objects that loading it would have to execute."""


class CheckpointFileError(UserError, ValueError):
    """A checkpoint file is missing, truncated or not a checkpoint at all; the message names it."""


class CheckpointNotFoundError(CheckpointFileError, FileNotFoundError):
    """The checkpoint file does not exist."""


CONVERTER = "tools/convert_checkpoint.py"
_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([\w.]+)")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else ""
    return (line[:160] + "...") if len(line) > 160 else (line or type(err).__name__)


def _unsafe_globals(path: str, err: BaseException) -> List[str]:
    """The Python objects a checkpoint names beyond what weights-only loading allows ([] when the
    refusal was about something else: a damaged or foreign file)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint: the unpickler's message names the object
        found = _GLOBAL_IN_MESSAGE.findall(str(err))
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in _SAFE_GLOBALS}
    return [name for name in found if name not in allowed]


def load_checkpoint_file(path: str, what: str = "checkpoint"):
    """``torch.load`` on CPU with ``weights_only=True``: tensors, numbers, strings and plain
    containers only (plus the Counter of an original scheduler state). A file holding any other
    Python object is refused, never executed: loading it would run code it names
    (``UnsafeCheckpointError``; ``tools/convert_checkpoint.py --trust-code`` converts a file the
    user trusts, once). A missing, empty, truncated or foreign file raises ``CheckpointFileError``
    naming it; ``what`` says what the file was meant to be ("checkpoint", "teacher checkpoint")."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointNotFoundError(f"{what} not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointFileError(f"{what} {path} is an empty file; expected a file written by torch.save")
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = _unsafe_globals(path, err)
        if not found:
            raise CheckpointFileError(
                f"{what} {path} is not a readable PyTorch checkpoint ({_first_line(err)}); expected a "
                f"file written by torch.save") from None
        raise UnsafeCheckpointError(
            f"{what} {path} holds Python objects other than tensors and plain containers "
            f"({', '.join(found)}), which loading it would execute; it is refused. If you trust the "
            f"file (you wrote it, or its authors gave it to you), convert it once with `python "
            f"{CONVERTER} {path} SAFE_COPY.pth --trust-code`, which runs that code one time and "
            f"writes a copy holding tensors only.") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, IndexError) as err:
        raise CheckpointFileError(
            f"cannot read {what} {path}: {_first_line(err)}. Expected a file written by torch.save; "
            f"this one is damaged (e.g. an interrupted copy or download) or is not a checkpoint."
        ) from None


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


def extract_model_state(obj) -> Tuple["OrderedDict[str, torch.Tensor]", str]:
    """The model state dict inside a loaded checkpoint object and the layout it was found in
    ("state_dict", "single" or "distillation"). Keys are not renamed here."""
    layout = "state_dict"
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        inner = obj["model"]
        if "student" in inner and isinstance(inner["student"], Mapping):
            obj, layout = inner["student"], "distillation"
        else:
            obj, layout = inner, "single"
    elif isinstance(obj, Mapping) and "student" in obj and isinstance(obj["student"], Mapping):
        obj, layout = obj["student"], "distillation"
    if not _is_state_dict(obj):
        raise CheckpointMismatchError(
            "no model state dict found: expected {'model': state_dict, ...}, "
            "{'model': {'student': state_dict, 'fgd': ...}, ...} or a state dict")
    return OrderedDict(obj), layout


def rename_legacy_keys(state_dict: Mapping[str, torch.Tensor]) -> Tuple["OrderedDict", int]:
    """Map torchvision-0.12 names and a ``module.`` prefix to the current names; returns the
    renamed dict and how many keys changed. A legacy name is only mapped when the new name is not
    already present."""
    keys = list(state_dict)
    strip = bool(keys) and all(k.startswith("module.") for k in keys)
    out, changed = OrderedDict(), 0
    present = set(k[len("module."):] if strip else k for k in keys)
    for key, value in state_dict.items():
        new = key[len("module."):] if strip else key
        for pattern, repl in _LEGACY_RULES:
            if pattern.match(new):
                candidate = pattern.sub(repl, new)
                if candidate not in present:
                    new = candidate
                break
        changed += new != key
        out[new] = value
    return out, changed


def _summarize(keys: Sequence[str], limit: int = 12) -> str:
    keys = sorted(keys)
    if len(keys) <= limit:
        return ", ".join(keys)
    groups: "OrderedDict[str, List[str]]" = OrderedDict()
    for k in keys:
        parts = k.split(".")
        prefix = ".".join(parts[:3]) if len(parts) > 3 else ".".join(parts[:-1]) or k
        groups.setdefault(prefix, []).append(k)
    return ", ".join(f"{p}.* ({len(v)} keys)" if len(v) > 1 else v[0] for p, v in groups.items())


def _frozen_bn_prefixes(model: nn.Module) -> set:
    return {name + "." if name else "" for name, m in model.named_modules()
            if isinstance(m, FrozenBatchNorm2d)}


def load_model_weights(model: nn.Module, path_or_state: Union[str, os.PathLike, Mapping], *,
                       drop_prefixes: Iterable[str] = ()) -> List[str]:
    """Load a checkpoint (path or loaded object, any layout above) strictly into ``model``.

    ``drop_prefixes``: checkpoint keys starting with one of these are not loaded (the model keeps
    its own values), e.g. ``("roi_heads.reid_loss.",)`` when an original PRW checkpoint's OIM
    tables do not fit the class map. Returns the sorted list of dropped checkpoint keys."""
    source = path_or_state
    if isinstance(path_or_state, (str, os.PathLike)):
        source = load_checkpoint_file(os.fspath(path_or_state))
    state, _layout = extract_model_state(source)
    state, _ = rename_legacy_keys(state)

    drop_prefixes = tuple(drop_prefixes)
    dropped = sorted(k for k in state if drop_prefixes and k.startswith(drop_prefixes))
    for k in dropped:
        del state[k]

    own = model.state_dict()
    frozen = _frozen_bn_prefixes(model)
    ignored = [k for k in state if k not in own and k.endswith(".num_batches_tracked")
               and k[: -len("num_batches_tracked")] in frozen]
    notices = []
    for k in ignored:
        del state[k]
    if ignored:
        notices.append(f"ignoring {len(ignored)} num_batches_tracked counters of BatchNorm "
                       f"layers that are FrozenBatchNorm2d in this model")
    if HEADER_CQ_KEY in own and HEADER_CQ_KEY not in state and not (
            drop_prefixes and HEADER_CQ_KEY.startswith(drop_prefixes)):
        state[HEADER_CQ_KEY] = torch.zeros_like(own[HEADER_CQ_KEY])
        notices.append(f"checkpoint has no {HEADER_CQ_KEY} (an original checkpoint): the OIM "
                       f"queue head starts at 0")

    expected = set(own)
    kept_own = {k for k in expected if drop_prefixes and k.startswith(drop_prefixes)}
    missing = sorted(expected - set(state) - kept_own)
    unexpected = sorted(set(state) - expected)
    mismatched = sorted(k for k in set(state) & expected
                        if tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or mismatched:
        lines = ["checkpoint does not fit the model (strict loading):"]
        if missing:
            lines.append(f"  missing {len(missing)} keys: {_summarize(missing)}")
        if unexpected:
            lines.append(f"  unexpected {len(unexpected)} keys: {_summarize(unexpected)}")
        if mismatched:
            shown = [f"{k} (checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)})"
                     for k in mismatched[:12]]
            more = f" and {len(mismatched) - 12} more" if len(mismatched) > 12 else ""
            lines.append(f"  shape mismatch in {len(mismatched)} keys: " + ", ".join(shown) + more)
        raise CheckpointMismatchError("\n".join(lines), missing, unexpected, mismatched)
    for k in kept_own:
        state[k] = own[k]
    model.load_state_dict(state, strict=True)
    for notice in notices:
        warnings.warn(notice, stacklevel=2)
    return dropped


def save_checkpoint(path: Union[str, os.PathLike], payload) -> None:
    """``torch.save(payload)`` atomically (``utils.fileio.atomic_write``): a crash leaves the
    previous file (if any) intact and no temporary file behind."""
    atomic_write(path, lambda f: torch.save(payload, f))
