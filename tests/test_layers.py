"""The layers hold: the pure core imports no SGLang, ZMQ or Prometheus, not even lazily."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "sglang_kvmul"
CORE = PKG / "core"
FORBIDDEN = ("sglang", "zmq", "prometheus_client")


def _imported(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def test_core_modules_import_nothing_forbidden():
    modules = sorted(CORE.glob("*.py"))
    assert len(modules) > 10
    leaks = {p.name: sorted(_imported(p) & set(FORBIDDEN)) for p in modules}
    assert not {k: v for k, v in leaks.items() if v}, leaks


def test_importing_every_core_module_loads_none_of_them():
    names = [f"sglang_kvmul.core.{p.stem}" for p in CORE.glob("*.py") if p.stem != "__init__"]
    code = (
        f"import importlib, sys; [importlib.import_module(m) for m in {names!r}]; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_every_module_imports():
    """Each module of the package imports in a fresh interpreter (an entry point such as the demo
    that imports a name from a module that moved fails here, not in a user's first command)."""
    names = sorted(
        ".".join(p.relative_to(PKG.parent).with_suffix("").parts) for p in PKG.rglob("*.py") if p.name != "__main__.py"
    )
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
