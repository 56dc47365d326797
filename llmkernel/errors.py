"""User-facing errors: one line that names the problem and the fix, exit code 2, no traceback.

Anything a user can cause (a missing file, a malformed row, a wrong column, an out-of-range value) raises a
`UserError`; `llmk` prints its message on one line and exits with `EXIT_USER_ERROR`. Bugs stay ordinary
exceptions with tracebacks. Optional dependencies are imported through `optional_import`, the one place
that turns a missing extra into an actionable message.
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error caused by input or configuration; its message is shown to the user as is."""


class ConfigError(UserError):
    """A config value is unknown, of the wrong type or out of range."""


class InputError(UserError):
    """An input file or folder is missing, empty or malformed."""


class MissingExtraError(UserError):
    """An optional dependency is not installed."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (library errors can span pages), or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# extra name -> the pip requirement that provides it
EXTRAS = {"ray": "llmkernel[ray]", "onnx": "llmkernel[onnx]", "llamacpp": "llmkernel[llamacpp]"}


def optional_import(module: str, extra: str) -> ModuleType:
    """Import `module`, or raise a MissingExtraError that says which `pip install` fixes it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        requirement = EXTRAS.get(extra, extra)
        raise MissingExtraError(
            f"'{module}' is not installed ({error}); install it with: pip install '{requirement}'"
        ) from None
