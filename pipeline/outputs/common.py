"""What the three result objects share: algorithm identity, new-series identity, equipment.

Every object (DESIGN.md, "Outputs") carries the source's Patient and Study, a new Series whose
description names the version (``"spine-node v2 ..."`` on a rerun), and Contributing Equipment
naming the algorithm (IHE AI Results, "Contributing Equipment").
"""
from __future__ import annotations

import datetime as _dt
import uuid
from dataclasses import dataclass, field
from importlib import metadata

from highdicom import ContributingEquipment
from pydicom.sr.codedict import codes as _codes

from pipeline.outputs.enums import ResultKind

#: Namespace of the name-based UUIDs behind our derived UIDs.
_UID_NAMESPACE = uuid.UUID("5b0c8f4e-7d1a-5c39-9a52-3f1e6b2d9c01")


def derived_uid(*parts: str) -> str:
    """A UID derived from ``parts``: ``2.25.`` + a name-based (SHA-1) UUID (PS3.5 B.2)."""
    return "2.25." + str(uuid.uuid5(_UID_NAMESPACE, "|".join(parts)).int)


def _package_version() -> str:
    try:
        return metadata.version("spine-node")
    except metadata.PackageNotFoundError:  # running from a checkout that was never installed
        return "0.0.0"


@dataclass(frozen=True)
class AlgorithmInfo:
    """Identity of the algorithm that produced the results.

    Goes into the General / Enhanced General Equipment modules, the SEG Algorithm Identification
    Sequence, the SR's TID 4019 Algorithm Identification and TID 1004 Device Observer, and the
    Contributing Equipment Sequence (Purpose of Reference DCM 109102 "Processing Equipment").
    """

    name: str = "spine-node vertebral fracture detection"
    version: str = field(default_factory=_package_version)
    manufacturer: str = "spine-node project"
    model_name: str = "spine-node"
    device_serial_number: str = "SPINENODE"
    #: Extra software version strings (e.g. the weights manifest digest), after ``version``.
    extra_versions: tuple[str, ...] = ()

    @property
    def software_versions(self) -> list[str]:
        """Software Versions (0018,1020), multi-valued LO."""
        return [self.version, *self.extra_versions]

    @property
    def device_uid(self) -> str:
        """A stable UID of this algorithm release (TID 1004 Device Observer UID)."""
        return derived_uid("device", self.manufacturer, self.model_name, self.version)

    @property
    def uid_salt(self) -> str:
        """What, besides the source series and the version, the result UIDs derive from."""
        return "|".join([self.device_serial_number, *self.software_versions])

    def contributing_equipment(self) -> ContributingEquipment:
        """Contributing Equipment item naming the algorithm (PS3.3 C.12.1, IHE AIR)."""
        return ContributingEquipment(
            manufacturer=self.manufacturer,
            purpose_of_reference=_codes.DCM.ProcessingEquipment,
            manufacturer_model_name=self.model_name,
            software_versions=self.software_versions,
            device_serial_number=self.device_serial_number,
            contribution_datetime=_dt.datetime.now(),
            contribution_description=f"{self.name} {self.version}"[:1024],
        )


#: Series Number offsets of each kind within one version (9000 + 10 * version + offset), so that a
#: viewer lists our series after the acquired ones and each version's three together.
_SERIES_OFFSET = {ResultKind.SEG: 1, ResultKind.SR: 2, ResultKind.KEY_IMAGE: 3}
_SERIES_TITLE = {
    ResultKind.SEG: "vertebrae SEG",
    ResultKind.SR: "fracture report SR",
    ResultKind.KEY_IMAGE: "key image",
}


@dataclass(frozen=True)
class OutputIdentity:
    """The new series (and the one instance in it) of one result object."""

    kind: ResultKind
    series_instance_uid: str
    sop_instance_uid: str
    series_number: int
    series_description: str
    instance_number: int = 1


def output_identity(source_series_uid: str, version: int, kind: ResultKind,
                    salt: str = "") -> OutputIdentity:
    """UIDs of the result of ``kind`` for ``version`` of the analysis of a source series.

    The UIDs are derived (``2.25`` + hash, PS3.5 B.2) from the source series, the version and the
    kind: building the same version twice (a worker that died after building, before recording)
    gives the same instances, so a PACS never gets two copies; a rerun (next version) gives new
    series and leaves the old ones alone. ``salt`` (the node and the algorithm release, see
    :meth:`AlgorithmInfo.uid_salt`) keeps two nodes that analyse the same series apart.
    """
    if version < 1:
        raise ValueError(f"version must be >= 1, not {version}")
    seed = [source_series_uid, f"v{version}", kind.value, salt]
    return OutputIdentity(
        kind=kind,
        series_instance_uid=derived_uid(*seed, "series"),
        sop_instance_uid=derived_uid(*seed, "instance"),
        series_number=9000 + 10 * version + _SERIES_OFFSET[kind],
        series_description=f"spine-node v{version} {_SERIES_TITLE[kind]}",
    )


def new_instance_arguments(identity: OutputIdentity, algorithm: AlgorithmInfo) -> dict:
    """The keyword arguments every highdicom constructor of ours takes for the new instance's
    General Series, SOP Common and General Equipment modules (PS3.3 C.7.3.1, C.12.1, C.7.5.1)."""
    return {
        "series_instance_uid": identity.series_instance_uid,
        "series_number": identity.series_number,
        "sop_instance_uid": identity.sop_instance_uid,
        "instance_number": identity.instance_number,
        "manufacturer": algorithm.manufacturer,
        "manufacturer_model_name": algorithm.model_name,
        "software_versions": algorithm.software_versions,
        "device_serial_number": algorithm.device_serial_number,
    }


def tracking_uid(source_series_uid: str, version: int, level_name: str, salt: str = "") -> str:
    """Tracking UID of one vertebra: the same in the SEG segment and in the SR group."""
    return derived_uid(source_series_uid, f"v{version}", "track", level_name, salt)
