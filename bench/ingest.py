"""C-STORE ingest benchmark (issue 8): dcmtk ``storescu`` sends one CT series to dcmtk
``storescp``, to Orthanc and to ``spine-node serve``, alternately, for several rounds.

    bench/ingest [--rounds 3] [--senders 1|4] [--slices 300] [--matrix 512]
                 [--peers storescp,orthanc,node[,storage]]
                 [--node-set storage.sqlite_synchronous=NORMAL]
                 [--variant NAME:[SRC_DIR]:[KEY=VALUE,...]] [--both-paths]
                 [--max-send-pdu N] [--delete-between] [--json FILE]

Every round starts each receiver fresh (empty store, new process), in a rotated order so that
no peer always goes first on a machine whose load changes. The stores are kept until the end
of the run (``--delete-between``: deleted as each receiver stops, the behaviour before
2026-11-28): on this machine's ext4, which has no journal, the kernel skips inodes deleted in
the last seconds (minutes while their inode table is not written back) when it allocates a new
one, one by one, so every file created after a few thousand deletions cost 0.3-0.9 ms of CPU,
for every receiver alike. A probe (100 empty files) prints that cost at the start and the end.
Per receiver it reports the median seconds (storescu start to last exit), MB/s, instances/s,
the receiver's CPU seconds during the transfer (``/proc/<pid>/stat`` utime+stime, less noisy
than wall time on a shared machine) and its peak RSS (``VmHWM``); then the node's throughput
as a ratio of Orthanc's and of storescp's (>1.0 = the node is faster). ``--senders 4`` splits
the series over four concurrent storescu processes (four associations).

Both receive paths in one run: ``--variant stock::node.fast_path=false`` (or ``--both-paths``)
adds a node with stock pynetdicom to the same rounds; ``--variant base:/tmp/old-checkout:`` a node
running older code (e.g. ``git archive <commit> | tar -x -C /tmp/old-checkout``). For every such
node variant it prints ``node`` against it, per round (same round = same machine load): > 1.0
means ``node`` (this checkout, its configuration) is faster.

``--peers`` may name ``storage``: no receiver, but the node's storage path alone
(bench/storage_path.py: the same instances written, synced and indexed as the SCP does after the
last PDU, one after the other, no network). With a node in the same rounds it prints the storage
path's share of that node's time, per round: how much of a one-sender transfer is disk and index
work that no faster network code would remove. (Until 2026-12-06 this printed storescp / (storescp
+ storage path) as a bound on the node against storescp; the node then beat it in every round,
e.g. 0.63x against 0.51x: storescp's time includes its own decoding and writing, so it is not a
floor under the node's network work, and the sum bounds nothing. bench/README.md, eighth round.)

The series (a synthetic 512 x 512 CT, Explicit VR Little Endian, one file per slice) is written
once and cached under ``$SPINE_BENCH_CACHE`` (default ``/var/tmp/spine-node-bench``); the stores
live in a temporary directory on the same file system. Every dcmtk tool and Orthanc run with
``TCP_NODELAY=1`` (Debian's dcmtk leaves Nagle on: ~45 ms per message otherwise).

Durability differs between the peers and is part of what is compared: storescp never fsyncs;
Orthanc 1.10 fsyncs each file (``SyncStorageArea``) and runs SQLite with ``synchronous=NORMAL``;
the node fsyncs each file and its directory and commits the index (``storage.sqlite_synchronous``
FULL by default) before it answers Success.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the series ---------------------------------------------------------------------------
def make_series(n_slices: int, matrix: int, cache: Path) -> tuple[Path, list[Path], int]:
    """Write (once) and return the series directory, its files and their total size."""
    directory = cache / f"ct-{n_slices}x{matrix}"
    done = directory / ".complete"
    if not done.exists():
        import numpy as np
        from pydicom.dataset import FileDataset, FileMetaDataset
        from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian, generate_uid
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        rng = np.random.default_rng(8)
        study, series, frame = generate_uid(), generate_uid(), generate_uid()
        yy, xx = np.mgrid[0:matrix, 0:matrix]
        body = ((yy - matrix / 2) ** 2 + (xx - matrix / 2) ** 2) < (matrix * 0.4) ** 2
        for k in range(n_slices):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = sop = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
            ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
            ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
            ds.FrameOfReferenceUID = frame
            ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = \
                "Bench^Ingest", "BENCH-1", "", "O"
            ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240102"
            ds.StudyTime = ds.SeriesTime = ds.ContentTime = "030405"
            ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "", "", "1"
            ds.SeriesNumber, ds.InstanceNumber, ds.Modality = 1, k + 1, "CT"
            ds.Manufacturer = "spine-node bench"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.PositionReferenceIndicator = ""
            ds.ImagePositionPatient = ["-200.0", "-200.0", f"{k * 1.0:.1f}"]
            ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
            ds.SliceLocation = f"{k * 1.0:.1f}"
            ds.SliceThickness, ds.PixelSpacing, ds.KVP = "1.0", ["0.78", "0.78"], "120"
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.Rows = ds.Columns = matrix
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
            noise = rng.integers(0, 40, size=(matrix, matrix), dtype=np.uint16)
            ds.PixelData = (np.where(body, 1000 + k % 50, 24) + noise).astype("<u2").tobytes()
            ds.save_as(directory / f"slice{k:04d}.dcm", enforce_file_format=True)
        done.write_text("ok")
    files = sorted(directory.glob("slice*.dcm"))
    return directory, files, sum(f.stat().st_size for f in files)


# -- helpers ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool(name: str) -> str:
    for candidate in (f"/usr/bin/{name}", f"/usr/local/bin/{name}", f"/usr/sbin/{name}"):
        if os.access(candidate, os.X_OK):
            return candidate
    sys.exit(f"{name} is not installed (apt-get install dcmtk orthanc)")


def _tree(pid: int) -> list[int]:
    """``pid`` and its live child processes (``node.acceptor_processes`` > 1 forks acceptors)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [pid, *(int(c) for c in fh.read().split())]
    except OSError:
        return [pid]


def _cpu_one(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # fields[0] is field 3 (state): utime = 14, stime = 15, cutime = 16, cstime = 17
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its child processes, all their threads."""
    return sum(_cpu_one(p) for p in _tree(pid))


def _hwm_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def peak_rss_mb(pid: int) -> float:
    """Peak resident set size of the process plus those of its live child processes."""
    return sum(_hwm_mb(p) for p in _tree(pid)) or float("nan")


def wait_port(port: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- receivers ----------------------------------------------------------------------------
@dataclass
class Receiver:
    name: str
    work: Path
    node_set: dict[str, str] = field(default_factory=dict)
    source: Path = REPO         # the spine-node checkout this receiver runs
    proc: subprocess.Popen | None = None
    port: int = 0
    aet: str = ""
    pid: int = 0

    def start(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.port = free_port()
        log = open(self.work / "receiver.log", "wb")
        if self.name == "storescp":
            self.aet = "STORESCP"
            (self.work / "store").mkdir()
            self.proc = subprocess.Popen([tool("storescp"), "-aet", self.aet, "-od",
                                          str(self.work / "store"), str(self.port)],
                                         env=DCMTK_ENV, stdout=log, stderr=subprocess.STDOUT)
            wait_port(self.port, self.proc)
        elif self.name == "orthanc":
            self.aet = "ORTHANC"
            http = free_port()
            cfg = {"Name": "bench", "StorageDirectory": str(self.work / "store"),
                   "IndexDirectory": str(self.work / "store"), "DicomAet": self.aet,
                   "DicomPort": self.port, "HttpPort": http, "HttpServerEnabled": True,
                   "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
                   "DicomServerEnabled": True, "DicomCheckCalledAet": False,
                   "DicomAlwaysAllowStore": True, "Plugins": [], "SaveJobs": False}
            (self.work / "orthanc.json").write_text(json.dumps(cfg))
            self._http = f"http://127.0.0.1:{http}"
            self.proc = subprocess.Popen([tool("Orthanc"), str(self.work / "orthanc.json")],
                                         env=DCMTK_ENV, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.work)
            wait_port(self.port, self.proc)
        else:
            self.aet = "SPINENODE"
            env = write_node_config(self.work, self.node_set, self.port, self.source)
            self.proc = subprocess.Popen([sys.executable, "-m", "dicom_node", "serve",
                                          "--config", str(self.work / "node.toml")],
                                         env=env, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.work)
            wait_port(self.port, self.proc, timeout=120)
        log.close()
        self.pid = self.proc.pid
        time.sleep(0.5)  # let start-up work that follows the listening socket settle

    def count(self) -> int:
        store = self.work / "store"
        if self.name == "storescp":
            return sum(1 for p in store.iterdir() if p.is_file())
        if self.name == "orthanc":
            with urllib.request.urlopen(self._http + "/statistics", timeout=10) as rsp:
                return int(json.loads(rsp.read())["CountInstances"])
        import sqlite3
        con = sqlite3.connect(store / "spine-node.db")
        try:
            return con.execute("SELECT count(*) FROM instances").fetchone()[0]
        finally:
            con.close()

    def stop(self, *, keep_store: bool = False) -> None:
        if self.proc is not None:
            stop(self.proc)
        if not keep_store:
            shutil.rmtree(self.work / "store", ignore_errors=True)


def write_node_config(work: Path, overrides: dict[str, str], port: int,
                      source: Path = REPO) -> dict[str, str]:
    """Write ``work/node.toml``, the node's settings in this benchmark (its store in
    ``work/store``) with ``overrides`` (SECTION.KEY=VALUE); returns the environment for a
    process that runs the node's code from ``source``: no SPINE_NODE_* of ours, and the
    ``env:VAR`` overrides set."""
    sections: dict[str, dict[str, object]] = {
        "node": {"ae_title": "SPINENODE", "host": "127.0.0.1", "port": port},
        "storage": {"root": str(work / "store"), "min_free_mb": 1},
        "worker": {"count": 0},
        "scheduler": {"stable_seconds": 3600},
        "http": {"enabled": False},
        "logging": {"level": "WARNING"},
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPINE_NODE_")}
    for key, value in overrides.items():
        if key.startswith("env:"):
            env[key[4:]] = value
            continue
        section, _, name = key.partition(".")
        sections.setdefault(section, {})[name] = _parse_value(value)
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    work.mkdir(parents=True, exist_ok=True)
    (work / "node.toml").write_text("\n".join(lines) + "\n")
    env["PYTHONPATH"] = str(source) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def creation_ms(directory: Path, count: int = 100) -> float:
    """Milliseconds per empty file created in a new ``directory`` (kept: deleting them would
    slow the next creations, see ``--delete-between``)."""
    directory.mkdir(parents=True)
    start = time.perf_counter()
    for i in range(count):
        os.close(os.open(directory / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
    return 1e3 * (time.perf_counter() - start) / count


def _parse_value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def storage_path(work: Path, files: list[Path], overrides: dict[str, str],
                 keep: bool) -> tuple[float, float]:
    """The ``storage`` peer: bench/storage_path.py in a fresh process on a fresh store under
    ``work``, with the node's settings in this benchmark (:func:`write_node_config`); its
    seconds for the instances and its CPU seconds meanwhile."""
    shutil.rmtree(work, ignore_errors=True)
    env = write_node_config(work, overrides, free_port())
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "storage_path.py"),
                           str(work / "node.toml"), *map(str, files)], env=env,
                          capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench/storage_path.py exited {proc.returncode}:\n"
                           + proc.stderr.decode(errors="replace")[-2000:])
    if not keep:
        shutil.rmtree(work / "store", ignore_errors=True)
    os.sync()
    result = json.loads(proc.stdout)
    return result["seconds"], result["cpu_s"]


def send(rcv: Receiver, files: list[Path], senders: int, extra: list[str]) -> float:
    groups = [files[i::senders] for i in range(senders)]
    start = time.perf_counter()
    procs = [subprocess.Popen([tool("storescu"), "-aec", rcv.aet, *extra, "127.0.0.1",
                               str(rcv.port), *map(str, group)], env=DCMTK_ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for group in groups]
    outputs = [p.communicate()[0] for p in procs]
    seconds = time.perf_counter() - start
    for p, out in zip(procs, outputs):
        if p.returncode != 0:
            raise RuntimeError(f"storescu to {rcv.name} exited {p.returncode}:\n"
                               + out.decode(errors="replace")[-2000:])
    return seconds


# -- main ---------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--senders", type=int, default=1)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--matrix", type=int, default=512)
    ap.add_argument("--peers", default="storescp,orthanc,node")
    ap.add_argument("--node-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="node configuration override, e.g. storage.sqlite_synchronous=NORMAL")
    ap.add_argument("--variant", action="append", default=[],
                    metavar="NAME:[SRC_DIR]:[KEY=VALUE,...]",
                    help="another node receiver in the same rounds, e.g. "
                         "normal::storage.sqlite_synchronous=NORMAL (KEY env:VAR sets an "
                         "environment variable), or base:/tmp/old-checkout: (older code)")
    ap.add_argument("--both-paths", action="store_true",
                    help="add the variant stock::node.fast_path=false: the node's fast receive "
                         "path and stock pynetdicom in the same rounds")
    ap.add_argument("--max-send-pdu", type=int, help="storescu --max-send-pdu")
    ap.add_argument("--delete-between", action="store_true",
                    help="delete each receiver's store as soon as it stops (the default keeps "
                         "them until the end of the run: on ext4 without a journal, files "
                         "created after many deletions cost up to ~1 ms of CPU each for a while)")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)

    cache = Path(os.environ.get("SPINE_BENCH_CACHE", "/var/tmp/spine-node-bench"))
    t0 = time.perf_counter()
    directory, files, total = make_series(a.slices, a.matrix, cache)
    mb = total / 1e6
    print(f"series: {len(files)} x {a.matrix}x{a.matrix}, {mb:.1f} MB ({directory}, "
          f"ready in {time.perf_counter() - t0:.1f} s); senders: {a.senders}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    node_set = dict(item.split("=", 1) for item in a.node_set)
    extra = ["--max-send-pdu", str(a.max_send_pdu)] if a.max_send_pdu else []
    peers = [p.strip() for p in a.peers.split(",") if p.strip()]
    variants: dict[str, tuple[Path, dict[str, str]]] = {}
    if a.both_paths:
        a.variant.insert(0, "stock::node.fast_path=false")
    for spec in a.variant:
        vname, src, sets = (spec.split(":", 2) + ["", ""])[:3]
        overrides = dict(node_set)
        overrides.update(dict(kv.split("=", 1) for kv in sets.split(",") if kv))
        variants[f"node-{vname}"] = (Path(src).resolve() if src else REPO, overrides)
        peers.append(f"node-{vname}")
    work = Path(tempfile.mkdtemp(prefix="spine-ingest-", dir=cache))
    keep = not a.delete_between
    needed = 1.3 * total * len(peers) * a.rounds
    if keep and shutil.disk_usage(work).free < needed + 2e9:
        print(f"less than {needed / 1e9:.1f} GB free for the stores: each is deleted when its "
              "receiver stops (--delete-between)")
        keep = False
    probe = {"start": creation_ms(work / "probe-start")}
    print(f"file creation probe: {probe['start']:.3f} ms per file (a fresh file system: "
          f"~0.02-0.05)", flush=True)
    results: dict[str, list[dict]] = {p: [] for p in peers}
    try:
        for r in range(a.rounds):
            order = peers[r % len(peers):] + peers[:r % len(peers)]
            for name in order:
                src, overrides = variants.get(name, (REPO, node_set))
                if name == "storage":
                    seconds, cpu = storage_path(work / f"round{r + 1}" / name, files,
                                                overrides, keep)
                    results[name].append({"seconds": seconds, "cpu_s": cpu,
                                          "peak_rss_mb": 0.0})
                    print(f"round {r + 1} {name:14s} {seconds:6.2f} s  (no network: the "
                          f"node's storage path alone)  cpu {cpu:5.2f} s", flush=True)
                    continue
                rcv = Receiver(name, work / f"round{r + 1}" / name, node_set=overrides,
                               source=src)
                try:
                    rcv.start()
                except Exception:
                    log = rcv.work / "receiver.log"
                    print(log.read_text(errors="replace")[-3000:] if log.exists() else "")
                    raise
                try:
                    cpu0 = cpu_seconds(rcv.pid)
                    seconds = send(rcv, files, a.senders, extra)
                    cpu = cpu_seconds(rcv.pid) - cpu0
                    rss = peak_rss_mb(rcv.pid)
                    n = rcv.count()
                finally:
                    rcv.stop(keep_store=keep)
                    # Write back what this receiver left dirty (storescp never syncs) before
                    # the next one starts, so that no receiver pays for another's writeback.
                    os.sync()
                if n != len(files):
                    raise RuntimeError(f"{name} holds {n} of {len(files)} instances")
                results[name].append({"seconds": seconds, "cpu_s": cpu, "peak_rss_mb": rss})
                print(f"round {r + 1} {name:14s} {seconds:6.2f} s  {mb / seconds:7.1f} MB/s  "
                      f"cpu {cpu:5.2f} s  rss {rss:6.0f} MB", flush=True)
        probe["end"] = creation_ms(work / "probe-end")
        print(f"file creation probe at the end: {probe['end']:.3f} ms per file")
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.sync()  # write the deletions back, so the next run's creations need not skip them

    summary: dict[str, dict] = {}
    print(f"\nmedian of {a.rounds} rounds, {len(files)} instances, {mb:.1f} MB, "
          f"{a.senders} sender(s):")
    print(f"{'receiver':14s} {'seconds':>8s} {'MB/s':>7s} {'inst/s':>7s} {'cpu s':>6s} "
          f"{'rss MB':>7s}")
    for name, runs in results.items():
        sec = statistics.median(x["seconds"] for x in runs)
        cpu = statistics.median(x["cpu_s"] for x in runs)
        rss = max(x["peak_rss_mb"] for x in runs)
        summary[name] = {"seconds": sec, "mb_per_s": mb / sec, "instances_per_s":
                         len(files) / sec, "cpu_s": cpu, "peak_rss_mb": rss,
                         "rounds": [round(x["seconds"], 3) for x in runs]}
        print(f"{name:14s} {sec:8.2f} {mb / sec:7.1f} {len(files) / sec:7.1f} {cpu:6.2f} "
              f"{rss:7.0f}")
    ratios = {}
    for node in [n for n in summary if n.startswith("node")]:
        for peer in ("orthanc", "storescp"):
            if peer in summary:
                # Throughput ratio: > 1.0 means the node is faster than the peer. Also per
                # round (same round = same machine load), whose median is less noisy.
                per_round = [p["seconds"] / n["seconds"] for p, n in
                             zip(results[peer], results[node])]
                ratios[f"{node}_vs_{peer}"] = {
                    "median_of_medians": summary[peer]["seconds"] / summary[node]["seconds"],
                    "median_per_round": statistics.median(per_round),
                    "per_round": per_round,
                    "cpu": summary[peer]["cpu_s"] / summary[node]["cpu_s"]}
        if node != "node" and "node" in results:
            # This checkout against a node variant (another path, configuration or checkout):
            # > 1.0 means "node" is faster.
            per_round = [v["seconds"] / n["seconds"] for v, n in
                         zip(results[node], results["node"])]
            ratios[f"node_vs_{node}"] = {
                "median_of_medians": summary[node]["seconds"] / summary["node"]["seconds"],
                "median_per_round": statistics.median(per_round), "per_round": per_round,
                "cpu": summary[node]["cpu_s"] / summary["node"]["cpu_s"]}
        if "storage" in results:
            # The storage path's share of the node's time (the disk and index work after the
            # last PDU of each instance), per round: a share, not a bound (module docstring).
            per_round = [s_["seconds"] / n["seconds"]
                         for s_, n in zip(results["storage"], results[node])]
            ratios[f"storage_share_of_{node}"] = {
                "median_per_round": statistics.median(per_round), "per_round": per_round}
            print(f"storage path (no network) / {node}: per-round median "
                  f"{statistics.median(per_round):.2f}, "
                  f"{min(per_round):.2f}-{max(per_round):.2f}")
    for key, value in ratios.items():
        if key.startswith("storage_share_of_"):
            continue
        # The range matters as much as the median: on a VM the peers that write through the
        # page cache swing with the host's memory (bench/README.md, sixth round).
        print(f"{key}: throughput {value['median_of_medians']:.2f}x "
              f"(per-round median {value['median_per_round']:.2f}x, "
              f"{min(value['per_round']):.2f}-{max(value['per_round']):.2f}x), "
              f"CPU efficiency {value['cpu']:.2f}x")
    out = {"instances": len(files), "megabytes": mb, "senders": a.senders,
           "node_set": node_set, "variants": {k: [str(v[0]), v[1]] for k, v in
                                              variants.items()}, "summary": summary, "ratios": ratios,
           "load_average": os.getloadavg(), "file_creation_ms": probe,
           "stores_kept": keep}
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
