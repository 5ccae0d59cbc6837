"""The node's storage path alone: what a received instance costs on this machine's disk with
no network and no DICOM decoding at all (issue 8; a command, and a peer of ``bench/ingest``).

    python bench/storage_path.py NODE_TOML FILE...

Reads the given DICOM files into memory first, then stores each through
:class:`storage.ingest.InstanceWriter` exactly as the storage SCP does after the last PDU of a
C-STORE (Part 10 prefix plus the data set in 128 KiB fragments; the file written under its
final name, fdatasynced, its directory fsynced and its index row committed, with the settings
of NODE_TOML, as ``bench/ingest`` writes them for its nodes), one after the other as one sender's
instances arrive, and prints the seconds for all of them and the process's CPU seconds
meanwhile as JSON (``{"seconds": ..., "cpu_s": ...}``).

Why: the node does this work after the last PDU of each instance and answers Success only
then, and one sender (``storescu``) waits for each answer before it sends the next instance,
so this is the part of a one-sender transfer that faster network code would not remove.
``bench/ingest --peers storage,node`` prints it as a share of the node's time in the same round
(bench/README.md, eighth round: an earlier reading of storescp's time plus this one as a bound
on the node was wrong, and the node beat it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from config.settings import load_settings  # noqa: E402
from dicom_node import part10  # noqa: E402
from dicom_node.context import NodeContext  # noqa: E402
from storage.index import InstanceRecord  # noqa: E402
from storage.ingest import InstanceWriter  # noqa: E402

#: The size of the data set fragments a 128 KiB P-DATA-TF PDU carries (storescu's PDUs).
FRAGMENT = 128 * 1024 - 12
_CT = "1.2.840.10008.5.1.4.1.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"


def run(config: Path, files: list[Path]) -> tuple[float, float]:
    """Seconds to store ``files`` one after the other with the node's settings in ``config``
    (see the module docstring), and the process's CPU seconds meanwhile."""
    ctx = NodeContext.open(load_settings(config))
    store = ctx.store
    writer = InstanceWriter.from_settings(ctx.settings, store, ctx.index)
    study, series = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.1.1"
    work = []
    for k, path in enumerate(files):
        raw = memoryview(path.read_bytes())
        dataset = raw[part10_offset(raw):]   # as received: the data set without File Meta
        fragments = [dataset[i:i + FRAGMENT] for i in range(0, len(dataset), FRAGMENT)]
        sop = f"{series}.{k + 1}"
        prefix = part10.file_prefix(_CT, sop, _EXPLICIT_LE)
        record = InstanceRecord(
            study_instance_uid=study, series_instance_uid=series, sop_instance_uid=sop,
            sop_class_uid=_CT, transfer_syntax_uid=_EXPLICIT_LE, modality="CT",
            path=store.instance_relpath(study, series, sop),
            size_bytes=len(prefix) + len(dataset), instance_number=k + 1, frames=1,
            calling_ae="BENCH")
        work.append((record, (prefix, *fragments)))
    cpu0, start = time.process_time(), time.perf_counter()
    for record, data in work:
        writer.store_instance(record, data)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu0
    ctx.index.close()
    ctx.db.dispose()
    return seconds, cpu


def part10_offset(raw: memoryview) -> int:
    """Where the data set starts in a PS3.10 file: after the preamble, ``DICM`` and the File
    Meta Information group, whose length its first element gives (PS3.10 7.1)."""
    if bytes(raw[128:132]) != b"DICM":
        raise ValueError("not a DICOM Part 10 file")
    group_length = int.from_bytes(raw[140:144], "little")   # (0002,0000) UL, explicit VR
    return 144 + group_length


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("files", type=Path, nargs="+")
    a = ap.parse_args(argv)
    seconds, cpu = run(a.config, a.files)
    print(json.dumps({"seconds": seconds, "cpu_s": cpu, "instances": len(a.files)}))


if __name__ == "__main__":
    main()
