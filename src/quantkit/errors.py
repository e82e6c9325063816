"""The one exception type users see: a one-line message naming the problem and the fix."""

from __future__ import annotations

__all__ = ["QuantkitError"]


class QuantkitError(Exception):
    """A user-facing error (bad config, bad input file, refused output path).

    The CLI prints ``error: <message>`` on one line and exits with ``exit_code`` (2: usage and config errors).
    """

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code
