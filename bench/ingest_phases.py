"""Where one received instance's time goes: the node's C-STORE handler phase by phase, in
process (issue 8; a command, not a test).

    python bench/ingest_phases.py [FULL|NORMAL|NOSYNC] [--rounds 3]

A :class:`dicom_node.scp.StorageSCP` runs in this process on a fresh store (all removed at the
end: deletions slow later file creations on some file systems, see bench/ingest.py); dcmtk
``storescu`` sends bench/ingest.py's series (300 x 512 x 512) to it. The handler's steps are
wrapped with timers; per instance it prints the wall time and this thread's CPU time of each.
Then the median of each stretch of one instance's round trip outside the handler: from our
response to the next request's first PDU (storescu's turn), the request's PDUs, from the last
PDU to the handler (DIMSE decoding, hand-off to the association thread, pynetdicom's service
class), and from the handler to the response sent. The association's DUL thread, which also
runs the handler since it serves C-STOREs itself (:mod:`dicom_node.fastpath.hooks`), is timed
whole and in parts (waiting for the peer, reading PDUs, DIMSE decoding, sending), and so is
the garbage collector. ``NOSYNC`` turns every fsync off (``storage.fsync = false``, SQLite
``NORMAL``): what the flushes cost is the difference to ``FULL``.
"""
from __future__ import annotations

import argparse
import collections
import functools
import gc
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.transport import AssociationSocket

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

# The imports below come after the sys.path lines above: bench/ is not a package, and the
# project's packages must be importable when this file runs as a script from a checkout.
import ingest  # noqa: E402 - bench/ingest.py: the series, the tools

import dicom_node.part10 as part10  # noqa: E402 - after sys.path (see above)
import storage.files as files  # noqa: E402
import storage.index as index  # noqa: E402
import storage.ingest as writer  # noqa: E402
from config.settings import Settings  # noqa: E402
from dicom_node import scp  # noqa: E402
from dicom_node.context import NodeContext  # noqa: E402
from dicom_node.fastpath import codec, hooks  # noqa: E402
from storage import direct_io  # noqa: E402

WALL: collections.Counter = collections.Counter()
CPU: collections.Counter = collections.Counter()
CALLS: collections.Counter = collections.Counter()
LABELS: list[str] = []   # in the order of _instrument: each step under the one that calls it
STORES: list[Path] = []


EVENTS: list[tuple[float, str]] = []   # (time, what) of the round trip outside the handler


def _marked(owner: object, name: str, start: str, end: str) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        EVENTS.append((time.perf_counter(), start))
        try:
            return fn(*args, **kwargs)
        finally:
            EVENTS.append((time.perf_counter(), end))

    setattr(owner, name, wrapper)


def round_trip() -> dict[str, float]:
    """Median milliseconds of each stretch of an instance's round trip (module docstring)."""
    spans: dict[str, list[float]] = collections.defaultdict(list)
    sent = first = last_pdu = start = end = None
    for t, what in EVENTS:
        if what == "pdu" and first is None and sent is not None:
            first = t
        elif what == "pdu_end":
            last_pdu = t
        elif what == "handler":
            start = t
        elif what == "handler_end":
            end = t
        elif what == "sent" and end is not None:
            if None not in (sent, first, last_pdu, start):
                spans["storescu's turn"].append(first - sent)
                spans["request PDUs"].append(last_pdu - first)
                spans["decode, hand-off"].append(start - last_pdu)
                spans["handler"].append(end - start)
                spans["response"].append(t - end)
            sent, first, end = t, None, None
    return {k: 1e3 * statistics.median(v) for k, v in spans.items()}


def _timed(owner: object, name: str, label: str) -> None:
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            WALL[label] += time.perf_counter() - wall
            CPU[label] += time.thread_time() - cpu
            CALLS[label] += 1

    setattr(owner, name, wrapper)
    LABELS.append(label)


_GC: dict[str, float] = {"seconds": 0.0, "runs": 0, "started": 0.0}


def _gc_timer(phase: str, info: dict) -> None:
    if phase == "start":
        _GC["started"] = time.perf_counter()
    else:
        _GC["seconds"] += time.perf_counter() - _GC["started"]
        _GC["runs"] += 1


def _instrument() -> None:
    gc.callbacks.append(_gc_timer)
    _marked(hooks.SCPDUL, "_read_pdu_data", "pdu", "pdu_end")
    _marked(DIMSEServiceProvider, "send_msg", "send", "sent")
    _marked(hooks.SCPDIMSE, "_send_store_rsp", "send", "sent")  # written without send_msg
    _marked(scp.StorageSCP, "_on_store", "handler", "handler_end")
    # The association's DUL thread, which also runs the handler (dicom_node.fastpath.hooks):
    # everything it does for the association, divided by the instances.
    _timed(hooks.SCPDUL, "_reactor_loop", "DUL thread, all of it")
    _timed(hooks.SCPDUL, "_wait", "  waiting for the peer")
    _timed(hooks.SCPDUL, "_read_pdu_data", "  reading PDUs")
    _timed(codec, "decode_msg", "  DIMSE decoding")
    _timed(AssociationSocket, "send", "  sending PDUs")
    _timed(scp.StorageSCP, "_on_store", "on_store (whole handler)")
    _timed(part10, "read_header", "  read_header")
    _timed(files.BlobStore, "write_new", "  write_new (final name)")
    _timed(files.BlobStore, "write_temp", "  write_temp")
    _timed(direct_io, "write_all", "    write")
    _timed(files, "start_writeback", "    start write-back")
    _timed(writer.GroupCommit, "submit", "  group commit")
    _timed(index.Index, "add_instances", "    index transaction")
    _timed(files.BlobStore, "place", "      rename")
    _timed(files, "_fsync_dir", "      directory fsync")
    _timed(files, "_fdatasync", "      data fdatasync")


def one_round(mode: str, series: list[Path]) -> float:
    tmp = Path(tempfile.mkdtemp(prefix="spine-phases-", dir=os.environ.get(
        "SPINE_BENCH_CACHE", "/var/tmp/spine-node-bench")))
    port = ingest.free_port()
    settings = Settings.model_validate({
        "node": {"ae_title": "SPINENODE", "host": "127.0.0.1", "port": port},
        "storage": {"root": str(tmp / "store"), "min_free_mb": 1,
                    "sqlite_synchronous": "NORMAL" if mode == "NOSYNC" else mode,
                    "fsync": mode != "NOSYNC"},
        "logging": {"level": "WARNING"}})
    ctx = NodeContext.open(settings)
    node = scp.StorageSCP(settings, ctx.index, ctx.store)
    node.start()
    try:
        time.sleep(0.3)
        start = time.perf_counter()
        subprocess.run([ingest.tool("storescu"), "-aec", "SPINENODE", "127.0.0.1", str(port),
                        *map(str, series)], env=ingest.DCMTK_ENV, check=True,
                       capture_output=True)
        return time.perf_counter() - start
    finally:
        node.drain()
        ctx.close()
        STORES.append(tmp)  # removed at the end: deletions slow the next creations (ingest.py)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", nargs="?", default="FULL", choices=("FULL", "NORMAL", "NOSYNC"))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    cache = Path(os.environ.get("SPINE_BENCH_CACHE", "/var/tmp/spine-node-bench"))
    _, series, _ = ingest.make_series(300, 512, cache)
    _instrument()
    for r in range(args.rounds):
        WALL.clear(), CPU.clear(), CALLS.clear(), EVENTS.clear()
        seconds = one_round(args.mode, series)
        n = len(series)
        print(f"round {r + 1} {args.mode}: {seconds:.2f} s for {n} instances "
              f"({1e3 * seconds / n:.2f} ms each)")
        for label in (lbl for lbl in LABELS if CALLS[lbl]):
            print(f"  {label:26s} {1e3 * WALL[label] / n:6.3f} ms wall  "
                  f"{1e3 * CPU[label] / n:6.3f} ms CPU per instance ({CALLS[label]} calls)")
        print(f"  garbage collection: {_GC['runs']} runs, "
              f"{1e3 * _GC['seconds'] / n:.3f} ms per instance")
        _GC.update(seconds=0.0, runs=0)
        print("  round trip, median ms: " + ", ".join(
            f"{k} {v:.3f}" for k, v in round_trip().items()))
        os.sync()
    for tmp in STORES:
        shutil.rmtree(tmp, ignore_errors=True)
    os.sync()


if __name__ == "__main__":
    main()
