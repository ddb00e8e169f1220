"""Every third-party module the package imports at run time is declared in pyproject.toml."""

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Imported only where SGLang itself runs (model building, CPU shims, CUDA probe): they come with
# the pinned SGLang, whose version fixes theirs.
VIA_SGLANG = {"torch", "torchvision", "transformers", "tokenizers"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_runtime_imports_are_declared():
    declared = {
        _norm(re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0])
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    dists = packages_distributions()
    missing = {}
    for path in (ROOT / "sglang_kvmul").rglob("*.py"):
        if "stubs" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == "sglang_kvmul" or top in VIA_SGLANG:
                    continue
                if not {_norm(d) for d in dists.get(top, [top])} & declared:
                    missing.setdefault(top, set()).add(path.relative_to(ROOT).as_posix())
    assert not missing, missing
