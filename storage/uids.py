"""DICOM UID validation: a UID becomes a file name only after :func:`validate_uid` (DESIGN.md).

PS3.5 9.1: components of digits separated by ".", no leading zero in a component other than
"0" itself, at most 64 characters. Nothing else (no "/", no "..", no spaces) can pass.
"""
from __future__ import annotations

import re

_UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
MAX_UID_LENGTH = 64


class InvalidUIDError(ValueError):
    """A value that is not a valid DICOM UID; the message says which attribute and why."""


def clean_uid(value: object) -> str:
    """The UID text without the NUL/space padding of the UI value representation."""
    if value is None:
        return ""
    return str(value).rstrip("\x00 ").lstrip(" ")


def is_valid_uid(value: object) -> bool:
    text = clean_uid(value)
    return 0 < len(text) <= MAX_UID_LENGTH and _UID_RE.fullmatch(text) is not None


def validate_uid(value: object, what: str = "UID") -> str:
    """Return the cleaned UID, or raise :class:`InvalidUIDError` naming ``what``."""
    text = clean_uid(value)
    if not text:
        raise InvalidUIDError(f"{what} is missing")
    if len(text) > MAX_UID_LENGTH:
        raise InvalidUIDError(f"{what} is {len(text)} characters long (at most 64)")
    if _UID_RE.fullmatch(text) is None:
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise InvalidUIDError(f"{what} {shown!r} is not a valid UID (digits and dots, "
                              "no leading zeros)")
    return text
