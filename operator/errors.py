"""The error every spec check raises (its own module so the parsers can share it without cycles)."""
from __future__ import annotations


class SpecError(ValueError):
    """An invalid resource; `reason` becomes the SpecValid condition's reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message
