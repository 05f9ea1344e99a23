"""Configuration: defaults <- YAML file <- command-line KEY VALUE pairs (SPEC 2).

``load_config`` merges with yacs semantics (strict keys, typed values) but with its own merge so
that errors name the offending key and where it came from, and so that values are normalised:

- strings are decoded as Python literals (``5e-5``, ``[5]``, ``((32,), (64,))``) unless the key
  holds a string;
- tuples become (nested) lists, the form every sequence default has and the form yacs dumps;
- an int may stand for a float, an integral float for an int, "true"/"false" for a bool;
- keys in ``defaults.UNTYPED_KEYS`` (legacy keys of unknown original type) take any value.
"""

import difflib
import os
import tempfile
from ast import literal_eval

import yaml
from yacs.config import CfgNode

from .defaults import _C, CHOICES, PROJECT_KEYS, UNTYPED_KEYS

__all__ = [
    "CfgNode",
    "ConfigError",
    "UnknownKeyError",
    "PROJECT_KEYS",
    "get_default_cfg",
    "load_config",
    "merge_dict",
    "merge_opts",
    "dump_config",
    "model_cfg_for_role",
    "is_distillation",
]

COMMAND_LINE = "the command line"

_ROLE_PATHS = {
    "baseline": ("BASELINE",),
    "teacher": ("DISTILLER", "TEACHER"),
    "student": ("DISTILLER", "STUDENT"),
}

_SCALAR_TYPES = (str, int, float, bool, type(None))


class ConfigError(ValueError):
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


def _check_choices(cfg):
    for full_key, allowed in CHOICES.items():
        node = cfg
        for part in full_key.split("."):
            node = node[part]
        if node not in allowed:
            raise ConfigError("config key {} is {!r}; allowed values: {}".format(
                full_key, node, ", ".join(repr(a) for a in allowed)))


def load_config(cfg_file=None, opts=(), freeze=True):
    """Defaults <- ``cfg_file`` (YAML) <- ``opts`` (KEY VALUE list as on a command line)."""
    cfg = get_default_cfg()
    if cfg_file is not None:
        merge_dict(cfg, _read_yaml(cfg_file), "config file {}".format(os.fspath(cfg_file)))
    merge_opts(cfg, opts or ())
    _check_choices(cfg)
    if freeze:
        cfg.freeze()
    return cfg


def dump_config(cfg, path):
    """Write ``cfg`` as YAML to ``path`` atomically (temporary file + os.replace)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    text = cfg.dump()
    fd, tmp = tempfile.mkstemp(prefix=".config-", suffix=".yaml.tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


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
