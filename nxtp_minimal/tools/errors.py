"""Mistakes in what a user gave us, and the checks that find them early with a clear message.

The command line prints a `UserError` as one line on stderr and exits 1, without a traceback.
"""

import os

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UserError(Exception):
    """A mistake in the command line or its inputs: reported in one line, no traceback."""


# What the command line and the demo page report as one line: the package raises these, with a message
# that says what was wrong and what to do, for every mistake in a user's input.
USER_ERRORS = (UserError, FileNotFoundError, ValueError, KeyError)


def message(error: Exception) -> str:
    """The one line for an error of USER_ERRORS (a KeyError's str() would add quotes)."""
    return str(error.args[0] if isinstance(error, KeyError) and error.args else error)


def check_device(name: str) -> str:
    """`name` if PyTorch can use it; a UserError that says what to use instead otherwise."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but this PyTorch has no CUDA device; use --device cpu")
    return name


def check_exists(path, what: str, hint: str) -> str:
    """`path` as a string if it exists; otherwise a FileNotFoundError "{what} not found: {path}. {hint}"."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}. {hint}")
    return path
