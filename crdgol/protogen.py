"""Compile proto/ into crdgol/pb with grpcio-tools (run by `make proto`).

The .proto files live under ``proto/crdgol/pb/`` so that the generated modules land in
``crdgol/pb/`` and import each other as ``crdgol.pb.<name>_pb2``.
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    src = ROOT / "proto"
    out = ROOT
    protos = sorted(str(p.relative_to(src)) for p in src.rglob("*.proto"))
    include = str(resources.files("grpc_tools") / "_proto")
    args = ["protoc", f"-I{src}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        print("protoc failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
