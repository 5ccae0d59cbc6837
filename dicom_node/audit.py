"""The audit trail: one append-only ``audit_events`` row and one JSON log line per event.

Each event is shaped after the DICOM audit messages of IHE ATNA (PS3.15 A.5.3, RFC 3881), so
that a later syslog exporter can emit them without asking anything more of the node:

- ``atna_event_id``: EventID code (DCM), e.g. ``110104`` "DICOM Instances Transferred";
- ``atna_event_type``: EventTypeCode where the message has one, e.g. ``110122`` "Login";
- ``atna_action``: EventActionCode (C create, R read, U update, D delete, E execute);
- ``atna_outcome``: EventOutcomeIndicator (0 success, 4 minor failure, 8 serious failure);
- the active participant: ``actor`` (an AE title, ``cli:<user>`` or the node), ``actor_host``;
- the participant object: ``study_instance_uid`` (and series or SOP Instance UIDs).

Only UIDs, AE titles, host addresses, counts and reasons go in: never a patient name, ID or
birth date (the node does not store them, and :mod:`dicom_node.logging` drops any field named
like one). Auditing never breaks what it audits: a failed write is logged and forgotten.
"""
from __future__ import annotations

from typing import Any

from dicom_node.logging import get_logger

log = get_logger("spine_node.audit")

#: event_type -> (EventID, EventTypeCode or None, EventActionCode)
EVENTS: dict[str, tuple[tuple[str, str], tuple[str, str] | None, str]] = {
    "association": (("110114", "User Authentication"), ("110122", "Login"), "E"),
    "tls_failure": (("110113", "Security Alert"), ("110126", "Node Authentication"), "E"),
    "node_started": (("110100", "Application Activity"), ("110120", "Application Start"), "E"),
    "node_stopped": (("110100", "Application Activity"), ("110121", "Application Stop"), "E"),
    "instances_received": (("110104", "DICOM Instances Transferred"), None, "C"),
    "study_received": (("110104", "DICOM Instances Transferred"), None, "C"),
    "job_started": (("110103", "DICOM Instances Accessed"), None, "R"),
    "job_finished": (("110103", "DICOM Instances Accessed"), None, "C"),
    "result_delivered": (("110104", "DICOM Instances Transferred"), None, "R"),
    "result_dead": (("110104", "DICOM Instances Transferred"), None, "R"),
    "rerun": (("110103", "DICOM Instances Accessed"), None, "U"),
    "resend": (("110106", "Export"), None, "R"),
    "studies": (("110112", "Query"), None, "E"),
    "jobs": (("110112", "Query"), None, "E"),
    "echo": (("110100", "Application Activity"), ("110128", "Network Configuration"), "E"),
    "db_upgrade": (("110113", "Security Alert"), ("110131", "Software Configuration"), "E"),
}

#: Our outcome words -> ATNA EventOutcomeIndicator.
OUTCOMES = {"success": 0, "accepted": 0, "nothing": 0, "done": 0, "skipped": 0,
            "rejected": 4, "partial": 4, "failed": 4, "retry": 4, "dead": 8, "error": 8}


def record(index, event_type: str, outcome: str, *, actor: str,
           actor_host: str | None = None, study_instance_uid: str | None = None,
           **details: Any) -> bool:
    """Write one audit event (database row and JSON log line). ``index``:
    :class:`storage.index.Index` (or None: the log line only). Returns whether the row was
    written."""
    event_id, event_code, action = EVENTS.get(event_type, (("110100", "Application Activity"),
                                                            None, "E"))
    atna = {"atna_event_id": event_id[0], "atna_event": event_id[1], "atna_action": action,
            "atna_outcome": OUTCOMES.get(outcome, 4)}
    if event_code is not None:
        atna["atna_event_type"] = event_code[0]
        atna["atna_event_type_name"] = event_code[1]
    row = {**atna, **({"actor_host": actor_host} if actor_host else {}),
           **({"study_instance_uid": study_instance_uid} if study_instance_uid else {}),
           **{k: v for k, v in details.items() if v is not None}}
    log.info(f"audit {event_type}", extra={"audit": True, "event": event_type,
                                            "outcome": outcome, "actor": actor,
                                            **{k: v for k, v in row.items()
                                               if k not in ("actor", "outcome")}})
    if index is None:
        return False
    try:
        index.audit(event_type, actor, outcome, row)
    except Exception:
        log.exception("audit write failed", extra={"event": event_type})
        return False
    return True


def association(index, calling_ae: str, host: str, *, accepted: bool,
                reason: str | None = None) -> None:
    """An association accepted or rejected (ATNA User Authentication, Login); a failed TLS
    handshake is a Security Alert (Node Authentication)."""
    event = "tls_failure" if reason and reason.startswith("TLS") else "association"
    if not accepted:
        log.warning("association rejected", extra={"calling_ae": calling_ae, "peer": host,
                                                   "reason": reason})
    record(index, event, "accepted" if accepted else "rejected",
           actor=f"{calling_ae}@{host}" if calling_ae else str(host), actor_host=str(host),
           calling_ae=calling_ae or None, reason=reason)
