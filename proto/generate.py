"""Regenerate the Python code of proto/stratoscope/*/*.proto: the wire contract (v1/) and
pprof's profile.proto (pprof/, vendored: what ``stratoscope query flamegraph --format pprof``
writes).

The .proto files are the single source of truth; the generated modules are not
committed, because protobuf's generated code must match the runtime that runs it.
Run: ``python proto/generate.py`` (scripts/setup.sh does it for you).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


def main() -> int:
    from grpc_tools import protoc  # dev dependency, installed by scripts/setup.sh

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    out = ROOT
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    rc = protoc.main(args)
    if rc != 0:
        print(f"protoc failed with exit code {rc}", file=sys.stderr)
        return rc
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
