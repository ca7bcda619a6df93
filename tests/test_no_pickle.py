"""Nothing in `tandem/` can unpickle: a static check of every module's syntax tree.

Data from clients, transports and the store is parsed (protobuf, JSON, checked KV headers),
never unpickled. Ray's own calls between our actors are the one exception, and they happen
inside Ray, not in our code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tandem"
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "marshal", "shelve",
                  "joblib"}


def violations(source: str, name: str = "<snippet>") -> list[str]:
    """What in `source` can deserialize arbitrary objects, as 'name:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source, name)):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names
                      if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module \
                and node.module.split(".")[0] in BANNED_MODULES:
            found.append(f"{where}: from {node.module} import ...")
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            keywords = {k.arg: k.value for k in node.keywords}
            if func.endswith("torch.load"):
                weights_only = keywords.get("weights_only")
                if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                    found.append(f"{where}: {func}() without weights_only=True")
            elif func in ("np.load", "numpy.load"):
                allow = keywords.get("allow_pickle")
                if allow is not None and not (isinstance(allow, ast.Constant)
                                              and allow.value is False):
                    found.append(f"{where}: {func}(allow_pickle=...)")
            elif func in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
                found.append(f"{where}: {func}() (use yaml.safe_load)")
            elif func in ("__import__", "importlib.import_module") and node.args \
                    and isinstance(node.args[0], ast.Constant) \
                    and str(node.args[0].value).split(".")[0] in BANNED_MODULES:
                found.append(f"{where}: {func}({node.args[0].value!r})")
    return found


def test_no_module_of_the_package_can_unpickle():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += violations(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    assert not found, "deserialization that can run code:\n" + "\n".join(found)


@pytest.mark.parametrize("snippet", [
    "import pickle",
    "import cloudpickle as cp",
    "from pickle import loads",
    "import torch\ntorch.load(f)",
    "import torch\ntorch.load(f, weights_only=False)",
    "import numpy as np\nnp.load(f, allow_pickle=True)",
    "import yaml\nyaml.load(s)",
    "import yaml\nyaml.load(s, Loader=yaml.Loader)",
    "__import__('pickle')",
    "import marshal",
])
def test_the_check_catches_each_way_to_unpickle(snippet):
    assert violations(snippet)


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load(f, weights_only=True)",
    "import numpy as np\nnp.load(f)",
    "import yaml\nyaml.safe_load(s)",
    "import json\njson.loads(s)",
])
def test_the_check_lets_safe_loading_through(snippet):
    assert not violations(snippet)
