"""Errors a user can act on: what failed, where, and what to do next.

Every error carries an exit code the CLI uses: 2 for bad input or usage,
3 for a failed numeric validation, 1 for a failure inside graphopt or a backend.
"""

from __future__ import annotations


class GraphoptError(Exception):
    """Base class. The message is one line: what failed, where, what to do."""

    exit_code = 1

    def __init__(self, what: str, *, where: str | None = None, hint: str | None = None):
        self.what, self.where, self.hint = what, where, hint
        parts = [what if where is None else f"{what} ({where})"]
        if hint:
            parts.append(hint)
        super().__init__(". ".join(p.rstrip(".") for p in parts) + ".")


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (library errors can span pages)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class InputError(GraphoptError):
    """Bad input: a missing, corrupt or inconsistent file, or wrong arguments."""

    exit_code = 2


class UnsupportedModelError(InputError):
    """The model uses operators graphopt (and onnxruntime) cannot interpret."""


class PassError(GraphoptError):
    """A pass failed; names the pass."""


class NumericMismatchError(GraphoptError):
    """A model's outputs moved beyond tolerance."""

    exit_code = 3


class BackendError(GraphoptError):
    """A backend (onnxruntime, TVM) failed to build or run a model."""
