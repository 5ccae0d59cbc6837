"""Floor of a pynetdicom C-STORE SCP on this machine, for issue 8's ratios (a command, not a test).

``storescu`` sends the benchmark series (bench/ingest.py's, 300 x 512 x 512) to a bare
pynetdicom SCP in this process that answers Success at once (``--mode null``) or after writing
the encoded data set without fsync (``--mode write``), on the node's listener
(:func:`dicom_node.acceptors.start_server`) with the fast path (``--path fast``,
:mod:`dicom_node.fastpath.hooks`) or stock pynetdicom (``--path stock``), pynetdicom's log
handlers unbound as in the node either way. What the node does on top (sync, index) costs the
difference to ``bench/ingest``'s node figure.

    python bench/scp_floor.py --rounds 3 --path fast --path stock
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

_CHILD = r"""
import os, sys, time, subprocess
sys.path.insert(0, {repo!r}); sys.path.insert(0, {bench!r})
mode, path = {mode!r}, {path!r}
from pynetdicom import AE, evt, AllStoragePresentationContexts
from dicom_node.acceptors import start_server
import ingest
from pathlib import Path
cache = Path(os.environ.get("SPINE_BENCH_CACHE", "/var/tmp/spine-node-bench"))
_, files, _ = ingest.make_series({slices}, {matrix}, cache)
def handle(event):
    if mode == "write":
        with open(os.path.join({tmp!r}, "last.dcm"), "wb") as fh:
            fh.write(event.encoded_dataset())
    return 0
ae = AE("FLOOR")
ae.maximum_pdu_size = 262144
for cx in AllStoragePresentationContexts:
    ae.add_supported_context(cx.abstract_syntax, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
port = ingest.free_port()
server = start_server(ae, ("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, handle)],
                      fast_path=path == "fast")
cpu = time.process_time()
t = time.perf_counter()
subprocess.run([ingest.tool("storescu"), "-aec", "FLOOR", "127.0.0.1", str(port),
                *map(str, files)], env=ingest.DCMTK_ENV, check=True, capture_output=True)
print(time.perf_counter() - t, time.process_time() - cpu)
server.shutdown()
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mode", choices=("null", "write"), default="null")
    ap.add_argument("--path", action="append", choices=("fast", "stock"),
                    help="the receive path (repeatable; default both)")
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--matrix", type=int, default=512)
    args = ap.parse_args(argv)
    variants = args.path or ["fast", "stock"]
    import tempfile
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for v in variants[r % len(variants):] + variants[:r % len(variants)]:
                code = _CHILD.format(repo=str(HERE.parent), bench=str(HERE), mode=args.mode,
                                     path=v, slices=args.slices, matrix=args.matrix, tmp=tmp)
                out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                     text=True, check=True)
                wall, cpu = map(float, out.stdout.split()[-2:])
                results[v].append((wall, cpu))
                print(f"round {r + 1} {v:24s} {wall:.2f} s  cpu {cpu:.2f} s", flush=True)
                os.sync()
    print(f"\nmedian of {args.rounds} rounds, {args.slices} instances, mode {args.mode}:")
    for v, rs in results.items():
        walls, cpus = sorted(w for w, _ in rs), sorted(c for _, c in rs)
        print(f"{v:24s} {walls[len(walls) // 2]:.2f} s  cpu {cpus[len(cpus) // 2]:.2f} s")


if __name__ == "__main__":
    main()
