"""Regenerate the Python stubs from `proto/tandem/v1/*.proto` (`make proto`).

protoc names modules after the proto path (`tandem.v1.x_pb2`); the stubs live in
`tandem.proto.v1`, so their cross-imports are rewritten to that package.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "proto"
OUT = Path(__file__).resolve().parent / "v1"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / "tandem" / "v1").glob("*.proto"))


def protoc(*args: str) -> None:
    from grpc_tools import protoc as grpc_protoc  # build-time tool, not a runtime dependency

    include = str(Path(grpc_protoc.__file__).parent / "_proto")
    argv = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", *args,
            *(str(p.relative_to(PROTO_ROOT)) for p in proto_files())]
    if grpc_protoc.main(argv) != 0:
        raise SystemExit(f"protoc failed: {' '.join(argv)}")


def generate(out: Path = OUT) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        protoc(f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}")
        out.mkdir(parents=True, exist_ok=True)
        for src in sorted((Path(tmp) / "tandem" / "v1").iterdir()):
            text = re.sub(r"\bfrom tandem\.v1 import\b", "from tandem.proto.v1 import",
                          src.read_text())
            (out / src.name).write_text(text)
    (out / "__init__.py").write_text('"""Generated stubs; regenerate with `make proto`."""\n')


def descriptor_set() -> bytes:
    """The FileDescriptorSet compiled from the .proto sources right now."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "set.pb"
        protoc(f"--descriptor_set_out={path}")
        return path.read_bytes()


if __name__ == "__main__":
    generate()
    sys.stdout.write(f"wrote stubs to {OUT}\n")
