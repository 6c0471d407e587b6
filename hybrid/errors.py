"""One shape for every configuration error, so users always see the field, the value and
what would have been accepted."""

from __future__ import annotations

from typing import Any


def invalid(field: str, value: Any, allowed: str) -> ValueError:
    """Build the ValueError raised for a bad configuration value."""
    return ValueError(f"{field}={value!r} is invalid; allowed: {allowed}")
