"""Errors a user can fix from their message alone, and how entry points report them.

``UserError`` is the base of the project's errors about its inputs: a config key or value
(configs.ConfigError), a dataset file (datasets.DatasetError), a checkpoint that cannot be read or
does not fit (models.checkpoint), an output folder that holds another run, a cache that belongs
to another model. Their messages name the file, key or value and what was expected.

``run_main`` runs an entry point's ``main``: a ``UserError`` ends the program with its message on
one line of stderr and exit status 2, without a traceback (a traceback of the loading code helps
nobody who passed the wrong file). Set the environment variable ``DDPS_DEBUG=1`` to get the
traceback anyway. Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import sys

__all__ = ["DEBUG_ENV", "UserError", "debug_enabled", "run_main"]

DEBUG_ENV = "DDPS_DEBUG"
USER_ERROR_EXIT = 2


class UserError(Exception):
    """An error in what the user gave (file, key, value); the message says what was expected."""


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def run_main(main, argv=None) -> None:
    """Call ``main(argv)`` and exit: 0 on success, 2 with one message for a UserError, 130 on
    Ctrl-C."""
    try:
        main(argv)
    except UserError as err:
        if debug_enabled():
            raise
        prog = os.path.basename(sys.argv[0]) or "ddps"
        print(f"{prog}: error: {err}", file=sys.stderr)
        print(f"(set {DEBUG_ENV}=1 to see where it was raised)", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(0)
