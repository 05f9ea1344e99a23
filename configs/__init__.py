"""Configuration: defaults <- YAML file <- command-line KEY VALUE pairs (SPEC 2).

``load_config`` merges with yacs semantics (strict keys, typed values) but with its own merge so
that errors name the offending key and where it came from, and so that values are normalised:

- strings are decoded as Python literals (``5e-5``, ``[5]``, ``((32,), (64,))``) unless the key
  holds a string;
- tuples become (nested) lists, the form every sequence default has and the form yacs dumps;
- an int may stand for a float, an integral float for an int, "true"/"false" for a bool;
- keys in ``defaults.UNTYPED_KEYS`` (legacy keys of unknown original type) take any value.

Inheritance (as in detectron2): a YAML file may name, in a top-level key ``_BASE_``, one file or a
list of files, relative to its own folder (or absolute). The bases are read first, in list order,
each with its own bases before it (recursively); the file's own keys are merged over them. Merging
is per key: sections merge, a value replaces a value. A file inherited in a cycle or a base that
does not exist is a ``ConfigError`` naming the files. Errors about a key name the file the key was
written in (a base file, if it came from there). ``_BASE_`` is not a config key: a loaded (and
dumped) config holds the merged result only, so an original ``config.yaml`` dump (which has no
``_BASE_``) loads exactly as before.
"""

import difflib
import os
from ast import literal_eval

import yaml
from yacs.config import CfgNode

from utils.errors import UserError
from utils.fileio import atomic_write

from .defaults import _C, CHOICES, POSITIVE_KEYS, PROJECT_KEYS, UNTYPED_KEYS

__all__ = [
    "CfgNode",
    "ConfigError",
    "UnknownKeyError",
    "PROJECT_KEYS",
    "get_default_cfg",
    "load_config",
    "config_layers",
    "BASE_KEY",
    "register_validator",
    "merge_dict",
    "merge_opts",
    "dump_config",
    "model_cfg_for_role",
    "is_distillation",
]

COMMAND_LINE = "the command line"

# The top-level key of a config file that names the file(s) it inherits from.
BASE_KEY = "_BASE_"

_ROLE_PATHS = {
    "baseline": ("BASELINE",),
    "teacher": ("DISTILLER", "TEACHER"),
    "student": ("DISTILLER", "STUDENT"),
}

_SCALAR_TYPES = (str, int, float, bool, type(None))


class ConfigError(UserError, ValueError):
    """A configuration that cannot be loaded: bad key, bad value, bad file."""


class UnknownKeyError(ConfigError, KeyError):
    """A key that the default configuration does not have."""

    def __str__(self):  # KeyError would print the message quoted
        return str(self.args[0])


def get_default_cfg():
    """A mutable copy of the default configuration."""
    return _C.clone()


def _to_lists(value):
    """Tuples and lists, at any depth, become lists."""
    if isinstance(value, (list, tuple)):
        return [_to_lists(v) for v in value]
    return value


def _valid_value(value):
    if isinstance(value, (list, tuple)):
        return all(_valid_value(v) for v in value)
    return isinstance(value, _SCALAR_TYPES)


def _describe(value):
    return "{} {!r}".format(type(value).__name__, value)


def _coerce(value, default, full_key, source):
    """Check ``value`` against the type of ``default`` and return it normalised."""
    if isinstance(value, str) and (not isinstance(default, str) or full_key in UNTYPED_KEYS):
        try:
            value = literal_eval(value)
        except (ValueError, SyntaxError):
            pass
    if not _valid_value(value):
        raise ConfigError(
            "config key {} from {}: {} is not a valid config value".format(
                full_key, source, _describe(value)))
    if full_key in UNTYPED_KEYS:
        return _to_lists(value)

    if isinstance(default, list):
        if isinstance(value, (list, tuple)):
            return _to_lists(value)
    elif isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    raise ConfigError(
        "type mismatch for config key {} from {}: expected {} (default {!r}), got {}".format(
            full_key, source, type(default).__name__, default, _describe(value)))


def _unknown_key(full_key, name, node, prefix, source):
    close = difflib.get_close_matches(str(name), [str(k) for k in node.keys()], n=3)
    hint = ""
    if close:
        hint = " (did you mean {}?)".format(
            ", ".join(prefix + k for k in close))
    return UnknownKeyError(
        "unknown config key {} (from {}){}".format(full_key, source, hint))


def merge_dict(cfg, data, source, _prefix=""):
    """Merge a nested dict (e.g. a parsed YAML file) into ``cfg`` in place.

    ``source`` names where ``data`` came from, for error messages.
    """
    if not isinstance(data, dict):
        raise ConfigError("{}: expected a mapping of config keys{}, got {}".format(
            source, " under " + _prefix.rstrip(".") if _prefix else "", _describe(data)))
    for key, value in data.items():
        full_key = _prefix + str(key)
        if key == BASE_KEY:
            raise ConfigError(
                "{} in {}: {} names the file(s) a config file inherits from; it is read by "
                "load_config at the top level of a file only".format(full_key, source, BASE_KEY))
        if key not in cfg:
            raise _unknown_key(full_key, key, cfg, _prefix, source)
        default = cfg[key]
        if isinstance(default, CfgNode):
            if value is not None:  # an empty section ("SOLVER:" and nothing under it)
                merge_dict(default, value, source, full_key + ".")
        elif isinstance(value, dict):
            raise ConfigError("config key {} from {} holds a value, not a section; got {}".format(
                full_key, source, _describe(value)))
        else:
            cfg[key] = _coerce(value, default, full_key, source)
    return cfg


def merge_opts(cfg, opts, source=COMMAND_LINE):
    """Merge command-line style overrides ``[KEY, VALUE, KEY, VALUE, ...]`` into ``cfg``."""
    opts = list(opts)
    if len(opts) % 2:
        raise ConfigError(
            "config overrides from {} must be KEY VALUE pairs, got an odd number ({}) of "
            "items: {}; {!r} has no value".format(source, len(opts), opts, opts[-1]))
    for full_key, value in zip(opts[0::2], opts[1::2]):
        if not isinstance(full_key, str) or not full_key:
            raise ConfigError("config override key from {} must be a non-empty string, got "
                              "{}".format(source, _describe(full_key)))
        node, prefix = cfg, ""
        parts = full_key.split(".")
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], CfgNode):
                raise _unknown_key(full_key, part, node, prefix, source)
            node, prefix = node[part], prefix + part + "."
        leaf = parts[-1]
        if leaf not in node:
            raise _unknown_key(full_key, leaf, node, prefix, source)
        if isinstance(node[leaf], CfgNode):
            raise ConfigError("config key {} from {} is a section; set its keys one by one "
                              "(e.g. {}.{})".format(full_key, source, full_key,
                                                    next(iter(node[leaf].keys()))))
        node[leaf] = _coerce(value, node[leaf], full_key, source)
    return cfg


def _read_yaml(path):
    try:
        with open(path, "r") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError("cannot read config file {}: {}".format(path, e)) from e
    except yaml.YAMLError as e:
        raise ConfigError("config file {} is not valid YAML: {}".format(path, e)) from e
    return {} if data is None else data


def _file_source(path, child=None):
    if child is None:
        return "config file {}".format(path)
    return "config file {} ({} of {})".format(path, BASE_KEY, child)


def _base_paths(path, data, source):
    """The files named by the ``_BASE_`` key of ``data`` (read from ``path``), resolved."""
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        return []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError("{} in {} must be a file name or a list of file names, got {}".format(
            BASE_KEY, source, _describe(bases)))
    folder = os.path.dirname(path)
    paths = []
    for base in bases:
        joined = os.path.join(folder, os.path.expanduser(base))
        tidy = os.path.normpath(joined)  # "a/b/../c" -> "a/c", unless a symbolic link says otherwise
        paths.append(tidy if os.path.realpath(tidy) == os.path.realpath(joined) else joined)
    return paths


def _collect_layers(path, child, chain, layers):
    source = _file_source(path, child)
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError("{}: expected a mapping of config keys, got {}".format(
            source, _describe(data)))
    data = dict(data)
    real = os.path.realpath(path)
    chain = chain + [(real, path)]
    for base in _base_paths(path, data, source):
        if not os.path.isfile(base):
            raise ConfigError("{}: its {} file {} does not exist".format(source, BASE_KEY, base))
        base_real = os.path.realpath(base)
        if any(base_real == r for r, _ in chain):
            start = [r for r, _ in chain].index(base_real)
            cycle = [p for _, p in chain[start:]] + [base]
            raise ConfigError("config files inherit from each other in a cycle ({}): {}".format(
                BASE_KEY, " -> ".join(cycle)))
        _collect_layers(base, path, chain, layers)
    layers.append((path, source, data))


def config_layers(cfg_file):
    """The YAML layers ``load_config`` merges for ``cfg_file``, in merge order: a list of
    ``(path, description, data)``, the bases first (each after its own bases), ``cfg_file``'s own
    keys last; ``data`` is the file's mapping without ``_BASE_``."""
    layers = []
    _collect_layers(os.fspath(cfg_file), None, [], layers)
    return layers


def _check_choices(cfg):
    for full_key, allowed in CHOICES.items():
        node = cfg
        for part in full_key.split("."):
            node = node[part]
        if node not in allowed:
            raise ConfigError("config key {} is {!r}; allowed values: {}".format(
                full_key, node, ", ".join(repr(a) for a in allowed)))


def _check_positive(cfg):
    for full_key in POSITIVE_KEYS:
        node = cfg
        for part in full_key.split("."):
            node = node[part]
        if node < 1:
            raise ConfigError(f"config key {full_key} is {node!r}; expected a whole number of at least 1")


_VALIDATORS = []


def register_validator(check):
    """Run ``check(cfg)`` on every config ``load_config`` returns; a ValueError it raises becomes
    a ConfigError. Layers above the configs register the checks that need their knowledge (the
    distillation package checks DISTILLER.TERMS against its registry), so that a bad value stops
    at load time, before any expensive work."""
    if check not in _VALIDATORS:
        _VALIDATORS.append(check)
    return check


def load_config(cfg_file=None, opts=(), freeze=True):
    """Defaults <- ``cfg_file`` (YAML, with its ``_BASE_`` files first) <- ``opts`` (KEY VALUE
    list as on a command line)."""
    cfg = get_default_cfg()
    source = COMMAND_LINE
    if cfg_file is not None:
        source = _file_source(os.fspath(cfg_file))
        for _, layer_source, data in config_layers(cfg_file):
            merge_dict(cfg, data, layer_source)
    merge_opts(cfg, opts or ())
    _check_choices(cfg)
    _check_positive(cfg)
    for check in _VALIDATORS:
        try:
            check(cfg)
        except ValueError as err:
            where = source + (" and the command line" if cfg_file is not None and opts else "")
            raise ConfigError("{} (from {})".format(err, where)) from None
    if freeze:
        cfg.freeze()
    return cfg


def dump_config(cfg, path):
    """Write ``cfg`` as YAML to ``path`` atomically (temporary file + os.replace). The file holds
    every key of the merged config and no ``_BASE_``: it loads alone, wherever it is copied."""
    text = cfg.dump()
    return atomic_write(path, lambda f: f.write(text), mode="w")


def model_cfg_for_role(cfg, role):
    """The node with the backbone settings of a model role: baseline, teacher or student."""
    try:
        parts = _ROLE_PATHS[role]
    except KeyError:
        raise ValueError("unknown model role {!r}; expected one of {}".format(
            role, ", ".join(_ROLE_PATHS))) from None
    node = cfg
    for part in parts:
        node = node[part]
    return node


def is_distillation(cfg):
    """True when the configuration trains a student by distillation (DISTILLER.PROJECT)."""
    return bool(cfg.DISTILLER.PROJECT)
