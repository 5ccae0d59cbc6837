"""Administration: ``studies``, ``jobs``, ``rerun``, ``resend``, ``echo``, ``db upgrade``.

``studies`` and ``jobs`` read the database directly, so they work while ``serve`` runs and
while it is down. Actions (rerun, resend, db upgrade) are written to the audit trail.
"""
from __future__ import annotations

import getpass
import json
import re
import time
from pathlib import Path

import typer

from dicom_node import audit
from dicom_node.context import CONFIG_OPTION, NodeContext, settings_or_exit
from storage.uids import InvalidUIDError, validate_uid

db_app = typer.Typer(help="Database maintenance.", no_args_is_help=True)


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # noqa: BLE001
        return "cli"


def _open(config: Path | None, upgrade: bool = True) -> NodeContext:
    return NodeContext.open(settings_or_exit(config), upgrade=upgrade)


def _record(index, event_type: str, outcome: str, **details) -> None:
    """Audit an action (rerun, resend, db upgrade, echo) in the audit table, the trail that
    ``serve``'s events go to as well. The terminal stays the command's: the event's JSON line
    goes to stderr only where the table could not take it (``echo`` before the node's database
    exists, a failed write), so that no event is lost."""
    import logging
    import sys

    from dicom_node.logging import JsonFormatter

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(JsonFormatter().format(record))

    lines: list[str] = []
    audit_log = logging.getLogger("spine_node.audit")
    handler, old_level, old_propagate = Keep(), audit_log.level, audit_log.propagate
    audit_log.addHandler(handler)
    audit_log.setLevel(logging.INFO)
    audit_log.propagate = False
    try:
        written = audit.record(index, event_type, outcome, actor=_actor(), **details)
    finally:
        audit_log.removeHandler(handler)
        audit_log.setLevel(old_level)
        audit_log.propagate = old_propagate
    if not written:
        print("\n".join(lines), file=sys.stderr)


def _study_uid(value: str) -> str:
    try:
        return validate_uid(value, "Study Instance UID")
    except InvalidUIDError as exc:
        raise typer.BadParameter(str(exc)) from None


def studies(config: Path = CONFIG_OPTION,
            as_json: bool = typer.Option(False, "--json", help="JSON (DESIGN.md contract)")
            ) -> None:
    """List the studies held, with their series, instance counts, states, and whether each
    series was chosen for analysis and why."""
    ctx = _open(config)
    try:
        data = ctx.index.studies()
        audit.record(ctx.index, "studies", "success", actor=_actor(), studies=len(data))
    finally:
        ctx.close()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    if not data:
        typer.echo("no studies")
    for study in data:
        typer.echo(study["study_instance_uid"])
        for s in study["series"]:
            mark = "*" if s["chosen"] else " "
            typer.echo(f"{mark} {s['series_instance_uid']}  {s['modality'] or '-':4} "
                       f"{s['instances']:5d} instances  {s['state']}"
                       + (f"\n      {s['reason']}" if s["reason"] else ""))


def jobs(config: Path = CONFIG_OPTION,
         as_json: bool = typer.Option(False, "--json", help="JSON (DESIGN.md contract)"),
         study: str = typer.Option(None, "--study", help="only this study")) -> None:
    """List the jobs: state, error (a skipped job's reason), attempts, selection reason."""
    ctx = _open(config)
    try:
        rows = ctx.index.jobs(study)
        audit.record(ctx.index, "jobs", "success", actor=_actor(),
                     study_instance_uid=study, jobs=len(rows))
    finally:
        ctx.close()
    if as_json:
        typer.echo(json.dumps([{"id": j.id, "study_instance_uid": j.study_instance_uid,
                                "series_instance_uid": j.series_instance_uid,
                                "state": j.state, "error": j.error, "attempts": j.attempts,
                                "reason": j.reason}
                               for j in rows], indent=2))
        return
    if not rows:
        typer.echo("no jobs")
    for j in rows:
        note = j.error or j.reason
        typer.echo(f"{j.id:5d} v{j.version} {j.state:8} attempts={j.attempts} "
                   f"{j.series_instance_uid}" + (f"\n      {note}" if note else ""))


def rerun(study_uid: str = typer.Argument(..., help="Study Instance UID"),
          config: Path = CONFIG_OPTION,
          series: str = typer.Option(None, "--series", metavar="UID",
                                     help="analyse this series of the study, whatever the "
                                          "selection chose (audited)")) -> None:
    """Queue a new job version for the study's chosen series (or for --series UID)."""
    uid = _study_uid(study_uid)
    series_uid = None
    if series is not None:
        try:
            series_uid = validate_uid(series, "Series Instance UID")
        except InvalidUIDError as exc:
            raise typer.BadParameter(str(exc)) from None
    ctx = _open(config)
    try:
        created = ctx.index.rerun_study(uid, series_uid)
        status, message = (0, None) if created else _nothing_to_rerun(ctx.index, uid,
                                                                      series_uid)
        _record(ctx.index, "rerun", "success" if created else "nothing",
                study_instance_uid=uid, series_instance_uid=series_uid,
                override=series_uid is not None, jobs=[j.id for j in created],
                reason=message if status else None)
    finally:
        ctx.close()
    if message is not None:
        typer.echo(message, err=status != 0)
        raise typer.Exit(status)
    for j in created:
        typer.echo(f"queued job {j.id} (version {j.version}) for series {j.series_instance_uid}")


def _nothing_to_rerun(index, study_uid: str, series_uid: str | None) -> tuple[int, str]:
    """Why ``rerun`` queued nothing, and the exit status: 1 for an unknown study or series and
    for a study with no chosen series; 0 where a job is already queued (it will run)."""
    study = index.studies(study_uid)
    if not study:
        return 1, (f"error: no study {study_uid} in this node's database "
                   "(`spine-node studies` lists those it holds)")
    series = {s["series_instance_uid"] for s in study[0]["series"]}
    if series_uid is not None and series_uid not in series:
        return 1, f"error: study {study_uid} has no series {series_uid}"
    from storage.models import JobState

    queued = [j for j in index.jobs(study_uid) if j.state == JobState.QUEUED.value
              and (series_uid is None or j.series_instance_uid == series_uid)]
    if queued:
        return 0, "\n".join(f"job {j.id} (version {j.version}) for series "
                             f"{j.series_instance_uid} is already queued: no new job"
                             for j in queued)
    return 1, (f"no series of study {study_uid} is chosen for analysis (all skipped or not yet "
               "decided): nothing to rerun; `--series UID` analyses one of them anyway")


def resend(study_uid: str = typer.Argument(..., help="Study Instance UID"),
           config: Path = CONFIG_OPTION) -> None:
    """Send the study's results to the destinations again."""
    uid = _study_uid(study_uid)
    ctx = _open(config)
    try:
        from storage.deliveries import DeliveryQueue, DestinationWants

        n = DeliveryQueue(ctx.db).resend(
            uid, DestinationWants.from_settings(ctx.settings.destinations))
        _record(ctx.index, "resend", "success" if n else "nothing",
                study_instance_uid=uid, deliveries=n)
    finally:
        ctx.close()
    if not n:
        typer.echo(f"no results of study {uid} to send", err=True)
        raise typer.Exit(1)
    typer.echo(f"{n} deliveries queued for study {uid}")


PEER_RE = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:]+):(?P<port>\d{1,5})$")


def echo(peer: str = typer.Argument(..., metavar="AE@HOST:PORT"),
         config: Path = CONFIG_OPTION,
         timeout: float = typer.Option(10.0, "--timeout", help="seconds")) -> None:
    """C-ECHO a DICOM peer, calling as node.ae_title."""
    m = PEER_RE.match(peer)
    if not m:
        raise typer.BadParameter(f"{peer!r} is not AE@HOST:PORT")
    settings = settings_or_exit(config)
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=settings.node.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(Verification)
    host = m["host"].strip("[]")
    start = time.perf_counter()
    assoc = ae.associate(host, int(m["port"]), ae_title=m["ae"])
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else \
            "no connection"
        typer.echo(f"C-ECHO {peer}: association {why}", err=True)
        _audit_echo(config, peer, "failed", why)
        raise typer.Exit(1)
    status = assoc.send_c_echo()
    assoc.release()
    ms = (time.perf_counter() - start) * 1000
    code = getattr(status, "Status", None)
    _audit_echo(config, peer, "success" if code == 0x0000 else "failed")
    if code != 0x0000:
        typer.echo(f"C-ECHO {peer}: failed (status {code})", err=True)
        raise typer.Exit(1)
    typer.echo(f"C-ECHO {peer}: Success (0x0000) in {ms:.0f} ms")


def _audit_echo(config: Path | None, peer: str, outcome: str, reason: str | None = None) -> None:
    """``echo`` needs no database: its audit event goes to the log, and to the audit table
    when the node's database already exists (an echo never creates one)."""
    settings = settings_or_exit(config)
    url = settings.storage.database_url
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        _record(None, "echo", outcome, peer=peer, reason=reason)
        return
    try:
        ctx = NodeContext.open(settings, upgrade=False)
    except Exception:  # noqa: BLE001 - the echo's own result stands
        _record(None, "echo", outcome, peer=peer, reason=reason)
        return
    try:
        _record(ctx.index, "echo", outcome, peer=peer, reason=reason)
    finally:
        ctx.close()


@db_app.command("upgrade")
def db_upgrade(config: Path = CONFIG_OPTION) -> None:
    """Create or migrate the database schema to the newest revision."""
    ctx = _open(config, upgrade=False)
    try:
        revision = ctx.db.upgrade()
        _record(ctx.index, "db_upgrade", "success", revision=revision)
    finally:
        ctx.close()
    typer.echo(f"database at revision {revision}")


def register(app: typer.Typer) -> None:
    app.command("studies")(studies)
    app.command("jobs")(jobs)
    app.command("rerun")(rerun)
    app.command("resend")(resend)
    app.command("echo")(echo)
    app.add_typer(db_app, name="db")
