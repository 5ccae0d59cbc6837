"""The DICOM Conformance Statement's tables, read from the code (docs/conformance-statement.md).

The statement (PS3.2) is prose around tables; the tables that must never drift from what the node
does are generated here from the objects that do it:

- the SOP classes and transfer syntaxes the Storage SCP accepts: the presentation contexts of a
  :class:`dicom_node.scp.StorageSCP` built with the default settings (what ``serve`` builds);
- the association policy values (AE title, PDU size, association count, timeouts): the defaults
  of :mod:`config.settings`;
- the objects the node creates (SEG, Comprehensive 3D SR, Secondary Capture): their SOP classes,
  and, given one example of each, the PS3.3 modules they contain (from highdicom's tables of
  the standard) and the coding schemes they use.

``python docs/generate_conformance.py`` rewrites the generated blocks of the statement;
tests/test_conformance_statement.py fails when a block differs from what this module renders and
checks the tables against a running SCP and against built result objects.

A generated block sits between ``<!-- BEGIN GENERATED: name -->`` and
``<!-- END GENERATED: name -->`` lines; everything outside the markers is hand-written.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.uid import UID

from config.settings import Settings

BEGIN = "<!-- BEGIN GENERATED: {name} -->"
END = "<!-- END GENERATED: {name} -->"
_BLOCK = re.compile(r"(<!-- BEGIN GENERATED: (?P<name>[\w-]+) -->\n)(?P<body>.*?)"
                    r"(<!-- END GENERATED: (?P=name) -->)", re.DOTALL)

#: The SOP classes of the objects the node creates, by result kind
#: (:class:`pipeline.outputs.enums.ResultKind` values).
CREATED_SOP_CLASSES: dict[str, str] = {
    "seg": "1.2.840.10008.5.1.4.1.1.66.4",   # Segmentation Storage
    "sr": "1.2.840.10008.5.1.4.1.1.88.34",   # Comprehensive 3D SR Storage
    "key_image": "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
}
#: Coding scheme designators and what they are (PS3.16 Section 8), for the coding scheme table.
CODING_SCHEMES: dict[str, str] = {
    "DCM": "DICOM Controlled Terminology (PS3.16 Annex D)",
    "SCT": "SNOMED CT",
    "LN": "LOINC",
    "UCUM": "Unified Code for Units of Measure",
    "RFC5646": "IETF language tags (RFC 5646), the language of the SR content",
}
#: Short names of the created objects, by SOP class, for "used in" columns.
_SHORT = {"1.2.840.10008.5.1.4.1.1.66.4": "SEG", "1.2.840.10008.5.1.4.1.1.88.34": "SR",
          "1.2.840.10008.5.1.4.1.1.7": "key image (SC)"}


def default_settings() -> Settings:
    """The built-in defaults, untouched by any file or SPINE_NODE_* environment variable."""
    return Settings.model_validate({})


# --- the SCP -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class AcceptedContext:
    """One abstract syntax the SCP accepts, with the transfer syntaxes it accepts for it."""

    sop_class_uid: str
    transfer_syntaxes: tuple[str, ...]

    @property
    def name(self) -> str:
        return UID(self.sop_class_uid).name


def scp_contexts(settings: Settings | None = None) -> list[AcceptedContext]:
    """The presentation contexts of the Storage SCP that ``serve`` runs with ``settings``.

    Built from a real :class:`~dicom_node.scp.StorageSCP` (not from its constants), so that a
    context added or dropped in its constructor shows here too.
    """
    from dicom_node.scp import StorageSCP  # the network stack, only when asked

    scp = StorageSCP(settings or default_settings(), index=None, store=None)
    return [AcceptedContext(str(cx.abstract_syntax), tuple(str(ts) for ts in cx.transfer_syntax))
            for cx in scp.ae.supported_contexts]


def _uid_table(uids: Iterable[str], header: str) -> str:
    rows = [f"| {header} | UID |", "|---|---|"]
    rows += [f"| {UID(uid).name} | `{uid}` |" for uid in uids]
    return "\n".join(rows)


def render_scp_sop_classes(contexts: list[AcceptedContext]) -> str:
    rows = ["| SOP Class | SOP Class UID | SCU | SCP |", "|---|---|---|---|"]
    for cx in sorted(contexts, key=lambda c: c.name):
        rows.append(f"| {cx.name} | `{cx.sop_class_uid}` | No | Yes |")
    return "\n".join(rows)


def render_scp_transfer_syntaxes(contexts: list[AcceptedContext]) -> str:
    """One table per distinct list of transfer syntaxes, naming the SOP classes it applies to."""
    groups: dict[tuple[str, ...], list[AcceptedContext]] = {}
    for cx in contexts:
        groups.setdefault(cx.transfer_syntaxes, []).append(cx)
    parts = []
    for syntaxes, members in sorted(groups.items(), key=lambda g: -len(g[0])):
        classes = ", ".join(f"{cx.name} (`{cx.sop_class_uid}`)"
                            for cx in sorted(members, key=lambda c: c.sop_class_uid))
        parts.append(f"Accepted for {classes}:\n\n" + _uid_table(syntaxes, "Transfer Syntax"))
    return "\n\n".join(parts)


def render_association_policy(settings: Settings | None = None) -> str:
    from dicom_node.scp import StorageSCP

    settings = settings or default_settings()
    node = settings.node
    ae = StorageSCP(settings, index=None, store=None).ae
    # Read back from the AE that the SCP configured: what it does, not what it was asked to do.
    rows = [
        ("Implementation Class UID", f"`{ae.implementation_class_uid}`"),
        ("Implementation Version Name", f"`{ae.implementation_version_name}`"),
        ("AE Title (`node.ae_title`)", f"`{ae.ae_title}`"),
        ("Listening TCP port (`node.port`)", f"{node.port}"),
        ("Maximum PDU size received (`node.max_pdu`, bytes)",
         f"{ae.maximum_pdu_size}" if ae.maximum_pdu_size else "unlimited"),
        ("Maximum number of simultaneous associations (`node.max_associations`)",
         f"{ae.maximum_associations}"),
        ("ACSE timeout (`node.acse_timeout_s`, s)", f"{ae.acse_timeout:g}"),
        ("DIMSE timeout (`node.dimse_timeout_s`, s)", f"{ae.dimse_timeout:g}"),
        ("Network timeout (`node.network_timeout_s`, s)", f"{ae.network_timeout:g}"),
        ("Calling AE titles accepted (`node.allowed_calling_aes`)",
         ", ".join(f"`{ae}`" for ae in node.allowed_calling_aes) or "any"),
        ("Peer addresses accepted (`node.allowed_hosts`)",
         ", ".join(f"`{h}`" for h in node.allowed_hosts) or "any"),
        ("Asynchronous operations window", "not supported (1 outstanding operation)"),
    ]
    return "\n".join(["| Setting | Default |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


#: When the SCP answers each C-STORE status (PS3.4 B.2.3), by :class:`dicom_node.scp.StoreStatus`
#: member name. A status added to the SCP without a line here renders as "see dicom_node/scp.py".
_STORE_STATUS_MEANING = {
    "SUCCESS": "The instance's data and file name are durable and its index row committed "
               "(docs/durability.md); also for an instance whose SOP Instance UID is already "
               "stored (kept once).",
    "REFUSED_SOP_CLASS_NOT_SUPPORTED": "The SOP class of the request is not one of those above.",
    "PROCESSING_FAILURE": "The instance could not be indexed; nothing is kept, resend it.",
    "OUT_OF_RESOURCES": "Free disk below `storage.min_free_mb`, or the write failed; nothing is "
                        "kept, resend later.",
    "DATASET_DOES_NOT_MATCH_SOP_CLASS": "SOP Class or SOP Instance UID in the data set differs "
                                        "from the C-STORE request.",
    "CANNOT_UNDERSTAND": "The data set cannot be parsed, or a Study/Series/SOP Instance UID is "
                         "not a valid UID (digits and dots, at most 64 characters).",
}


def render_store_statuses() -> str:
    from dicom_node.scp import StoreStatus

    rows = ["| Status | Code | When |", "|---|---|---|"]
    for status in StoreStatus:
        meaning = _STORE_STATUS_MEANING.get(status.name, "see `dicom_node/scp.py`")
        title = status.name.replace("_", " ").capitalize().replace(" sop ", " SOP ")
        rows.append(f"| {title} | `{int(status):04X}H` | {meaning} |")
    return "\n".join(rows)


#: The configurable parameters the statement lists in 4.4.2, by settings key.
_PARAMETERS = [
    ("Additional storage SOP classes accepted", ["node.extra_storage_sop_classes"]),
    ("Free disk below which C-STORE is refused (A700H), MB", ["storage.min_free_mb"]),
    ("Seconds without a new instance before a series is complete", ["scheduler.stable_seconds"]),
    ("Modalities and minimum number of slices analysed",
     ["selection.modalities", "selection.min_slices"]),
    ("Series eligible: largest slice thickness and spacing mm, least z coverage mm, "
     "largest angle of the slice normal to the patient's z axis (degrees)",
     ["selection.max_slice_mm", "selection.min_coverage_mm", "selection.axial_tolerance_deg"]),
    ("ACSE / DIMSE timeouts (SCU), s", ["exporter.acse_timeout_s", "exporter.dimse_timeout_s"]),
    ("Retry backoff (SCU): first delay s, factor, longest delay s, attempts",
     ["exporter.backoff_start_s", "exporter.backoff_factor", "exporter.backoff_max_s",
      "exporter.max_attempts"]),
]


def _show(value) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def render_parameters(settings: Settings | None = None) -> str:
    settings = settings or default_settings()
    rows = ["| Parameter | Key | Default |", "|---|---|---|"]
    for title, keys in _PARAMETERS:
        values = [getattr(getattr(settings, k.split(".")[0]), k.split(".")[1]) for k in keys]
        rows.append(f"| {title} | {', '.join(f'`{k}`' for k in keys)} | "
                    f"{'; '.join(_show(v) for v in values)} |")
    return "\n".join(rows)


# --- the objects the node creates --------------------------------------------------------------

def render_created_sop_classes() -> str:
    rows = ["| Object | SOP Class | SOP Class UID |", "|---|---|---|"]
    titles = {"seg": "Vertebra segmentation", "sr": "Fracture report",
              "key_image": "Key image (mid-sagittal)"}
    for kind, uid in CREATED_SOP_CLASSES.items():
        rows.append(f"| {titles[kind]} | {UID(uid).name} | `{uid}` |")
    return "\n".join(rows)


_ACRONYMS = {"sop", "sr", "ct", "sc", "icc", "voi", "lut", "ge", "mr", "pet", "us", "rt"}


def _module_title(key: str) -> str:
    words = key.split("-")
    return " ".join(w.upper() if w in _ACRONYMS else w.capitalize() for w in words)


@dataclass(frozen=True)
class ModuleUse:
    ie: str
    module: str
    usage: str  # M, C or U (PS3.3)
    present: bool
    #: Every top-level attribute of the module is Type 3: a module that is "used" while empty.
    optional_only: bool


def iod_modules(ds: Dataset) -> list[ModuleUse]:
    """The modules of ``ds``'s IOD (PS3.3 Annex A, via highdicom's tables of the standard) and
    whether ``ds`` contains each: a module is present when one of its top-level attributes is."""
    from highdicom._standard_utils import get_iod_module_map, get_module_attribute_map, get_sop_class_iod_map
    from pydicom.datadict import tag_for_keyword

    iod = get_sop_class_iod_map()[str(ds.SOPClassUID)]
    attributes = get_module_attribute_map()
    uses = []
    for item in get_iod_module_map()[iod]:
        # Repeating-group attributes (Overlay*) have no single tag: never ours, skip them.
        top = [a for a in attributes[item["key"]]
               if not a["path"] and tag_for_keyword(a["keyword"]) is not None]
        present = any(a["keyword"] in ds for a in top)
        optional_only = all(a["type"] == "3" for a in top)
        uses.append(ModuleUse(item["ie"], _module_title(item["key"]), item["usage"], present,
                              optional_only))
    return uses


def render_iod_modules(ds: Dataset) -> str:
    rows = ["| IE | Module | Usage (PS3.3) | Present |", "|---|---|---|---|"]
    for use in iod_modules(ds):
        if use.present:
            rows.append(f"| {use.ie} | {use.module} | {use.usage} | Always |")
        elif use.usage == "M":
            why = "Empty (all its attributes are Type 3)" if use.optional_only else "**Missing**"
            rows.append(f"| {use.ie} | {use.module} | {use.usage} | {why} |")
    return "\n".join(rows)


def _codes(item: Dataset) -> Iterable[tuple[str, str, str]]:
    """(scheme, value, meaning) of every code sequence item anywhere in ``item``."""
    for element in item:
        if element.VR != "SQ":
            continue
        for child in element.value:
            if "CodeValue" in child and "CodingSchemeDesignator" in child:
                yield (str(child.CodingSchemeDesignator), str(child.CodeValue),
                       str(child.get("CodeMeaning", "")))
            yield from _codes(child)


def coding_schemes(objects: Iterable[Dataset]) -> dict[str, set[str]]:
    """Coding scheme designator -> the kinds of object (SEG, SR, key image) that use it."""
    found: dict[str, set[str]] = {}
    for ds in objects:
        for scheme, _value, _meaning in _codes(ds):
            found.setdefault(scheme, set()).add(_SHORT.get(str(ds.SOPClassUID), str(ds.Modality)))
    return found


def private_schemes(objects: Iterable[Dataset]) -> dict[str, tuple[str, str]]:
    """Designator -> (name, responsible organization) from the Coding Scheme Identification
    Sequence of each object."""
    declared = {}
    for ds in objects:
        for item in ds.get("CodingSchemeIdentificationSequence", []):
            declared[str(item.CodingSchemeDesignator)] = (
                str(item.get("CodingSchemeName", "")),
                str(item.get("CodingSchemeResponsibleOrganization", "")))
    return declared


def render_coding_schemes(objects: list[Dataset]) -> str:
    used = coding_schemes(objects)
    declared = private_schemes(objects)
    rows = ["| Coding Scheme Designator | Coding scheme | Used in |", "|---|---|---|"]
    for scheme in sorted(used):
        if scheme in declared:
            name, org = declared[scheme]
            title = f"{name} (private, {org}; declared in Coding Scheme Identification Sequence)"
        else:
            title = CODING_SCHEMES.get(scheme, scheme)
        rows.append(f"| `{scheme}` | {title} | {', '.join(sorted(used[scheme]))} |")
    return "\n".join(rows)


def private_codes() -> dict[str, str]:
    """Code value -> meaning of every code of the project's private coding scheme, as
    :mod:`pipeline.outputs.codes` defines them (module-level codes and code tables)."""
    from pydicom.sr.coding import Code

    from pipeline.outputs import codes

    found: dict[str, str] = {}
    for value in vars(codes).values():
        candidates = value.values() if isinstance(value, dict) else [value]
        for code in candidates:
            if isinstance(code, Code) and code.scheme_designator == codes.PRIVATE_SCHEME:
                found[code.value] = code.meaning
    return found


def render_private_codes() -> str:
    from pipeline.outputs.codes import PRIVATE_SCHEME

    rows = ["| Coding Scheme Designator | Code Value | Code Meaning |", "|---|---|---|"]
    rows += [f"| `{PRIVATE_SCHEME}` | `{v}` | {m} |" for v, m in sorted(private_codes().items())]
    return "\n".join(rows)


def scu_contexts(examples: Mapping[str, Dataset]) -> list[AcceptedContext]:
    """The presentation contexts the exporter proposes for the created objects: built by
    :func:`dicom_node.scu.presentation_contexts`, the function the exporter uses."""
    from pathlib import Path

    from dicom_node import scu

    items = [scu._Item(Path(kind), str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                       str(ds.file_meta.TransferSyntaxUID)) for kind, ds in examples.items()]
    return [AcceptedContext(str(cx.abstract_syntax), tuple(str(ts) for ts in cx.transfer_syntax))
            for cx in scu.presentation_contexts(items)]


def render_scu_contexts(contexts: list[AcceptedContext]) -> str:
    rows = ["| SOP Class | Transfer Syntaxes proposed, in order of preference | Role |",
            "|---|---|---|"]
    for cx in contexts:
        syntaxes = ", ".join(f"{UID(ts).name} (`{ts}`)" for ts in cx.transfer_syntaxes)
        rows.append(f"| {cx.name} (`{cx.sop_class_uid}`) | {syntaxes} | SCU |")
    return "\n".join(rows)


def render_overview(scp: list[AcceptedContext], scu_sop_classes: Iterable[str]) -> str:
    """PS3.2's overview table: every SOP class, as SCU and as SCP."""
    scp_classes = {cx.sop_class_uid for cx in scp}
    scu_classes = set(scu_sop_classes)
    verification = "1.2.840.10008.1.1"
    rows = ["| SOP Class | User of Service (SCU) | Provider of Service (SCP) |", "|---|---|---|",
            "| **Transfer** | | |"]
    for uid in sorted((scp_classes | scu_classes) - {verification}, key=lambda u: UID(u).name):
        rows.append(f"| {UID(uid).name} | {'Yes' if uid in scu_classes else 'No'} | "
                    f"{'Yes' if uid in scp_classes else 'No'} |")
    rows += ["| **Verification** | | |",
             f"| {UID(verification).name} | Yes (`spine-node echo`, a diagnostic command) | "
             f"{'Yes' if verification in scp_classes else 'No'} |"]
    return "\n".join(rows)


# --- the statement -----------------------------------------------------------------------------

def render_blocks(examples: Mapping[str, Dataset] | None = None,
                  settings: Settings | None = None) -> dict[str, str]:
    """Every generated block by name. ``examples``: one created object per kind (``seg``,
    ``sr``, ``key_image``), for the module and coding scheme tables; without them only the
    network blocks are rendered."""
    contexts = scp_contexts(settings)
    blocks = {
        "scp-sop-classes": render_scp_sop_classes(contexts),
        "scp-transfer-syntaxes": render_scp_transfer_syntaxes(contexts),
        "association-policy": render_association_policy(settings),
        "scp-store-statuses": render_store_statuses(),
        "parameters": render_parameters(settings),
        "created-sop-classes": render_created_sop_classes(),
    }
    if examples:
        objects = [examples[kind] for kind in CREATED_SOP_CLASSES]
        blocks["overview"] = render_overview(contexts,
                                             [str(ds.SOPClassUID) for ds in objects])
        blocks["scu-contexts"] = render_scu_contexts(scu_contexts(examples))
        for kind in CREATED_SOP_CLASSES:
            blocks[f"modules-{kind.replace('_', '-')}"] = render_iod_modules(examples[kind])
        blocks["coding-schemes"] = render_coding_schemes(objects)
        blocks["private-codes"] = render_private_codes()
    return blocks


def generated_blocks(text: str) -> dict[str, str]:
    """The generated blocks of a statement, by name (bodies without the marker lines)."""
    return {m["name"]: m["body"].strip("\n") for m in _BLOCK.finditer(text)}


def update_statement(text: str, blocks: Mapping[str, str]) -> str:
    """``text`` with each generated block's body replaced; a block in ``blocks`` without its
    markers in ``text`` is an error (the prose decides where a table goes)."""
    missing = set(blocks) - set(generated_blocks(text))
    if missing:
        raise ValueError("the statement has no markers for: " + ", ".join(sorted(missing)))

    def replace(match: re.Match) -> str:
        name = match["name"]
        body = blocks.get(name, match["body"].strip("\n"))
        return f"{match.group(1)}{body}\n{match.group(4)}"

    return _BLOCK.sub(replace, text)


_UID_IN_TABLE = re.compile(r"`([0-9]+(?:\.[0-9]+)+)`")


def uids_in(block: str) -> list[str]:
    """The UIDs written (in back-quotes) in a block, in order."""
    return _UID_IN_TABLE.findall(block)


def statement_scp_pairs(text: str) -> set[tuple[str, str]]:
    """(SOP class UID, transfer syntax UID) pairs that the statement says the SCP accepts, read
    from its transfer syntax block ("Accepted for <classes>:" followed by a table)."""
    block = generated_blocks(text)["scp-transfer-syntaxes"]
    pairs = set()
    for group in re.split(r"\n(?=Accepted for )", block):
        head, _, table = group.partition("\n")
        for sop_class in uids_in(head):
            pairs.update((sop_class, ts) for ts in uids_in(table))
    return pairs
