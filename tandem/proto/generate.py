"""Regenerate the Python stubs from `proto/tandem/v1/*.proto` (`make proto`).

protoc names modules after the proto path (`tandem.v1.x_pb2`); the stubs live in
`tandem.proto.v1`, so their cross-imports are rewritten to that package.
"""

from __future__ import annotations

import importlib.util
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
    """Run grpc_tools' protoc in a child process: its bundled protobuf runtime must not share
    a process with NIXL's (they crash each other), and tests import both."""
    spec = importlib.util.find_spec("grpc_tools")  # build-time tool, not a runtime dependency
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("grpc_tools is not installed: pip install grpcio-tools")
    include = str(Path(spec.submodule_search_locations[0]) / "_proto")
    argv = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", *args,
            *(str(p.relative_to(PROTO_ROOT)) for p in proto_files())]
    if subprocess.run(argv, check=False).returncode != 0:
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
