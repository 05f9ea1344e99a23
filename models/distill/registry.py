"""The registry of distillation terms, and which terms a config asks for.

A term registers itself with ``@register_term("name")`` in its own module (imported by
``models/distill/__init__.py``). A config names its terms in one key, ``DISTILLER.TERMS``
(e.g. ``[pkd, ld, cd]``); when that key is empty, the original release's ``DISTILLER.TYPE``
names decide, so that original config dumps load and mean what they meant:

    FGD_DKD_Relation (DDPS)  -> dfd, ld, cd       PKD      -> pkd
    PKD_DKD_Relation         -> pkd, ld, cd       ReviewKD -> reviewkd
    ReviewKD_DKD_Relation    -> reviewkd, ld, cd  NONE     -> (no term: the student alone)
    and the DDPS sub-combinations of the original's table: FGD, DKD, Relation, FGD_DKD,
    FGD_Relation, DKD_Relation.

With a TYPE that contains DDPS's terms, the switches FGD.ENABLED, DKD.ENABLED and
GRAPHRELA.ENABLED (kept so that configs written by earlier versions of this project mean the same)
remove a term; DISTILLER.TERMS is the way to write any combination.

``check_config`` runs when a config is loaded (``configs.load_config``, once this package is
imported: every entry point imports it before it loads a config): an unknown name in
DISTILLER.TERMS or DISTILLER.TYPE stops there, with the known names listed, before any data or
model is touched. Building a distiller checks the names again (``term_names``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Type

from .base import DistillTerm

__all__ = ["LEGACY_TYPES", "TERMS", "build_terms", "check_config", "known_terms", "register_term",
           "term_names"]

TERMS: Dict[str, Type[DistillTerm]] = {}

LEGACY_TYPES = {
    "NONE": (),
    "FGD_DKD_Relation": ("dfd", "ld", "cd"),
    "PKD": ("pkd",),
    "PKD_DKD_Relation": ("pkd", "ld", "cd"),
    "ReviewKD": ("reviewkd",),
    "ReviewKD_DKD_Relation": ("reviewkd", "ld", "cd"),
    "FGD": ("dfd",),
    "DKD": ("ld",),
    "Relation": ("cd",),
    "FGD_DKD": ("dfd", "ld"),
    "FGD_Relation": ("dfd", "cd"),
    "DKD_Relation": ("ld", "cd"),
}
# the project's switches of DDPS's terms (ablations of earlier versions)
_SWITCHES = {"dfd": "FGD", "ld": "DKD", "cd": "GRAPHRELA"}


def register_term(name: str):
    """Class decorator: register a DistillTerm subclass under ``name``."""

    def decorate(cls):
        if not (isinstance(cls, type) and issubclass(cls, DistillTerm)):
            raise TypeError(f"{cls!r} is not a DistillTerm subclass")
        if name in TERMS and TERMS[name] is not cls:
            raise ValueError(f"a distillation term named {name!r} is already registered ({TERMS[name].__name__})")
        cls.name = name
        TERMS[name] = cls
        return cls

    return decorate


def known_terms() -> List[str]:
    return sorted(TERMS)


def _unknown(what: str, value, known) -> ValueError:
    return ValueError(f"{what}: unknown {value!r}; known: {', '.join(known)}")


def term_names(cfg) -> List[str]:
    """The terms a config asks for, in order (see the module docstring)."""
    d = cfg.DISTILLER
    names = list(d.get("TERMS", []) or [])
    if names:
        for name in names:
            if name not in TERMS:
                raise _unknown("DISTILLER.TERMS", name, known_terms())
        if len(set(names)) != len(names):
            raise ValueError(f"DISTILLER.TERMS names a term twice: {names}")
        return names
    if d.TYPE not in LEGACY_TYPES:
        raise ValueError(f"DISTILLER.TYPE: unknown {d.TYPE!r}; known: {', '.join(LEGACY_TYPES)} "
                         f"(or name the terms in DISTILLER.TERMS; known terms: {', '.join(known_terms())})")
    return [n for n in LEGACY_TYPES[d.TYPE] if n not in _SWITCHES or cfg[_SWITCHES[n]].get("ENABLED", True)]


def check_config(cfg) -> None:
    """Validate the distillation terms of a distillation config (raises ValueError)."""
    if cfg.DISTILLER.PROJECT or cfg.DISTILLER.get("TERMS"):
        term_names(cfg)


def build_terms(cfg, names, student_channels: int, teacher_channels: int) -> "OrderedDict[str, DistillTerm]":
    """The terms ``names`` built from ``cfg`` for the given FPN widths."""
    terms: "OrderedDict[str, DistillTerm]" = OrderedDict()
    for name in names:
        if name not in TERMS:
            raise _unknown("distillation term", name, known_terms())
        terms[name] = TERMS[name].from_config(cfg, student_channels, teacher_channels)
    keys = [t.state_key for t in terms.values()]
    if len(set(keys)) != len(keys) or "student" in keys:
        raise ValueError(f"distillation terms {names} share a checkpoint entry: {keys}")
    return terms


def _register_config_check():
    from configs import register_validator

    register_validator(check_config)


_register_config_check()
