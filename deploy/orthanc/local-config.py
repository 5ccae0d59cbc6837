#!/usr/bin/env python3
"""Write an Orthanc configuration for one machine without containers (Debian's ``orthanc``).

It is deploy/orthanc/orthanc.json (the compose stack's PACS) with the container's names and
paths replaced: the node is reached on loopback, the Lua routing script is taken from this
folder, the storage goes to ``--out``, and the DICOMweb plugin is loaded from the Debian package
``orthanc-dicomweb`` when it is installed. docs/operations.md (section 1, without containers) uses it,
and so does tests/deploy/test_orthanc_routing.py, so the documented commands are the tested ones.

    python3 deploy/orthanc/local-config.py --out var/orthanc
    Orthanc var/orthanc/orthanc.json

Standard library only: it runs before the project is installed.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
TARGET = "spine-node"  # the DicomModalities key that route-to-spine-node.lua sends to


def local_config(out: Path, node_host: str = "127.0.0.1", node_port: int | None = None,
                 dicom_port: int | None = None, http_port: int | None = None,
                 stable_age: int | None = None, dicomweb_plugin: Path | None = DICOMWEB_PLUGIN,
                 ) -> dict:
    """The configuration as a dict; ``None`` keeps the value of deploy/orthanc/orthanc.json."""
    config = json.loads((HERE / "orthanc.json").read_text())
    storage = out / "db"
    config["StorageDirectory"] = config["IndexDirectory"] = str(storage)
    lua = out / "route-to-spine-node.lua"
    config["LuaScripts"] = [str(lua)]
    modality = config["DicomModalities"][TARGET]
    modality["Host"] = node_host
    if node_port is not None:
        modality["Port"] = node_port
    if dicom_port is not None:
        config["DicomPort"] = dicom_port
    if http_port is not None:
        config["HttpPort"] = http_port
    if stable_age is not None:
        config["StableAge"] = stable_age
    # On a shared host the unauthenticated REST API stays on loopback.
    config["RemoteAccessAllowed"] = False
    if dicomweb_plugin is not None and dicomweb_plugin.exists():
        config["Plugins"] = [str(dicomweb_plugin)]
    else:
        config.pop("DicomWeb", None)
    return config


def write(out: Path, **options) -> Path:
    """Write ``out/orthanc.json`` and the routing script beside it; return the JSON's path."""
    out = out.resolve()
    (out / "db").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HERE / "route-to-spine-node.lua", out / "route-to-spine-node.lua")
    path = out / "orthanc.json"
    path.write_text(json.dumps(local_config(out, **options), indent=2) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for config and storage")
    parser.add_argument("--node-host", default="127.0.0.1", help="where spine-node listens")
    parser.add_argument("--node-port", type=int, help="spine-node's DICOM port (default 11112)")
    parser.add_argument("--dicom-port", type=int, help="Orthanc's DICOM port (default 4242)")
    parser.add_argument("--http-port", type=int, help="Orthanc's HTTP port (default 8042)")
    parser.add_argument("--stable-age", type=int,
                        help="seconds without a new instance before a series is routed")
    args = parser.parse_args()
    path = write(args.out, node_host=args.node_host, node_port=args.node_port,
                 dicom_port=args.dicom_port, http_port=args.http_port,
                 stable_age=args.stable_age)
    print(path)


if __name__ == "__main__":
    main()
