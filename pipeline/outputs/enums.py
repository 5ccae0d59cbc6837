"""Enumerated values of the results (the kinds of object, and the standard's enumerated values
that highdicom does not already define)."""
from __future__ import annotations

from enum import Enum


class ResultKind(str, Enum):
    """What a stored result is; the values are the ``results.kind`` column of the index."""

    SEG = "seg"
    SR = "sr"
    KEY_IMAGE = "key_image"
    SUMMARY = "summary"

    @property
    def is_dicom(self) -> bool:
        return self is not ResultKind.SUMMARY


class BurnedInAnnotation(str, Enum):
    """Burned In Annotation (0028,0301), PS3.3 C.7.6.1.1.3."""

    YES = "YES"
    NO = "NO"


class VerificationFlag(str, Enum):
    """Verification Flag (0040,A493), PS3.3 C.17.2: results of the algorithm are never verified
    by a person when they leave the node (IHE AI Results)."""

    UNVERIFIED = "UNVERIFIED"
    VERIFIED = "VERIFIED"
