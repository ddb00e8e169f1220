"""Generate the upstream patch that adds `kvmul` as a native `--load-balance-method` to SGLang.

The patch is made from this package's own sources, so it never drifts from them:
  * the controller module and every module of this package it imports, transitively (found by
    reading the imports, so the layout decides: `core/`, the serving modules it uses, their
    `__init__.py` files; not the plugin hook, the launcher, the demo or the CPU shims) are copied to
    `python/sglang/srt/managers/kvmul/`, imports rewritten;
  * five upstream files get small edits: the CLI choice, the `LoadBalanceMethod` enum and the
    construction of the controller, the load-snapshot ownership rule, the KV publisher's guard, and
    the scheduler's start, which installs the count of fresh requests and finished outputs.
The pristine upstream files are read from the installed SGLang and checked against the release
wheel's own RECORD hashes, so they are the bytes of the pinned release.

    python patches/make_patch.py            # rewrite patches/sglang-0.5.23-kvmul.patch
    python patches/make_patch.py --check    # exit 1 if the committed patch is stale
"""

from __future__ import annotations

import argparse
import ast
import base64
import csv
import difflib
import hashlib
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "sglang_kvmul"
VERSION = "0.5.23"
PATCH = Path(__file__).resolve().parent / f"sglang-{VERSION}-kvmul.patch"
TARGET_PKG = "sglang/srt/managers/kvmul"

# What the patched-in code starts from: the controller class, the KV-event guard and cross-node
# registration the publisher module installs in the scheduler processes, and the scheduler's count of
# fresh requests and finished outputs (`marginal_fresh`'s inputs).
ENTRIES = (
    "serving/controller.py",
    "serving/event_privacy.py",
    "serving/event_registration.py",
    "serving/fresh_outputs.py",
)


# (upstream file, [(anchor, replacement)]): each anchor must occur exactly once.
EDITS: dict[str, list[tuple[str, str]]] = {
    "sglang/srt/arg_groups/fields/parallel.py": [
        (
            '                "total_tokens",\n            ],\n        ),\n    ] = "auto"',
            '                "total_tokens",\n                "kvmul",\n            ],\n        ),\n    ] = "auto"',
        ),
    ],
    "sglang/srt/disaggregation/kv_events.py": [
        (
            "        return constructor(attn_dp_rank=attn_dp_rank, **config_dict)\n",
            "        return constructor(attn_dp_rank=attn_dp_rank, **config_dict)\n"
            "\n"
            "\n"
            "# kvmul: KV events carry prompts' token ids; restrict the publisher's sockets to the\n"
            "# controller's address when SGLANG_KVMUL_EVENT_PEERS is set; across nodes, each publisher\n"
            "# registers its address with node 0's controller (sglang/srt/managers/kvmul).\n"
            "from sglang.srt.managers.kvmul.serving import event_privacy as _kvmul_event_privacy  # noqa: E402\n"
            "from sglang.srt.managers.kvmul.serving import (  # noqa: E402\n"
            "    event_registration as _kvmul_event_registration,\n"
            ")\n"
            "\n"
            "_kvmul_event_privacy.install_from_env()\n"
            "_kvmul_event_registration.install()\n",
        ),
    ],
    "sglang/srt/managers/scheduler.py": [
        (
            "    load_plugins()\n    dp_rank = resolve_spawn_dp_rank(dp_rank)\n",
            "    load_plugins()\n"
            "    # kvmul: the running requests not yet decoding and the finished outputs, in each load\n"
            "    # snapshot (sglang/srt/managers/kvmul/serving/fresh_outputs.py)\n"
            "    from sglang.srt.managers.kvmul.serving import fresh_outputs as _kvmul_fresh_outputs\n"
            "\n"
            "    _kvmul_fresh_outputs.install()\n"
            "    dp_rank = resolve_spawn_dp_rank(dp_rank)\n",
        ),
    ],
    "sglang/srt/managers/load_snapshot.py": [
        (
            '_LOAD_AWARE_METHODS = frozenset({"total_requests", "total_tokens"})',
            '_LOAD_AWARE_METHODS = frozenset({"total_requests", "total_tokens", "kvmul"})',
        ),
    ],
    "sglang/srt/managers/data_parallel_controller.py": [
        (
            "    TOTAL_TOKENS = auto()\n",
            "    TOTAL_TOKENS = auto()\n"
            "    # Exact KV-cache x batch-size rule (sglang/srt/managers/kvmul).\n"
            "    KVMUL = auto()\n",
        ),
        (
            "            LoadBalanceMethod.TOTAL_TOKENS: self.total_tokens_scheduler,\n        }",
            "            LoadBalanceMethod.TOTAL_TOKENS: self.total_tokens_scheduler,\n"
            "            # The kvmul subclass installs its own dispatcher over this base.\n"
            "            LoadBalanceMethod.KVMUL: self.round_robin_scheduler,\n        }",
        ),
        (
            "        controller = DataParallelController(\n",
            "        controller_cls = DataParallelController\n"
            '        if get_parallel().load_balance_method == "kvmul":\n'
            "            from sglang.srt.managers.kvmul.serving.controller import (\n"
            "                KvmulDataParallelController as controller_cls,\n"
            "            )\n"
            "        controller = controller_cls(\n",
        ),
    ],
}


def installed_sglang_root() -> Path:
    dist = importlib.metadata.distribution("sglang")
    if dist.version != VERSION:
        raise SystemExit(f"installed sglang is {dist.version}, the patch targets {VERSION}")
    return Path(str(dist.locate_file("")))


def pristine(relpath: str) -> str:
    """An upstream file's text, verified against the release wheel's RECORD hash."""
    dist = importlib.metadata.distribution("sglang")
    record = {row[0]: row[1] for row in csv.reader((dist.read_text("RECORD") or "").splitlines()) if row}
    data = (installed_sglang_root() / relpath).read_bytes()
    algo, _, expected = record[relpath].partition("=")
    digest = base64.urlsafe_b64encode(hashlib.new(algo, data).digest()).rstrip(b"=").decode()
    if digest != expected:
        raise SystemExit(f"{relpath} differs from the sglang {VERSION} wheel (is the installed SGLang patched?)")
    return data.decode()


def _own_imports(relpath: str) -> set[str]:
    """This package's modules that `relpath` imports (module files, relative to the package)."""
    found = set()
    for node in ast.walk(ast.parse((PKG / relpath).read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name == "sglang_kvmul" or name.startswith("sglang_kvmul."):
                parts = name.split(".")[1:]
                for cand in ("/".join(parts) + ".py", "/".join([*parts, "__init__.py"])):
                    if (PKG / cand).is_file():
                        found.add(cand)
    return found


def modules() -> list[str]:
    """ENTRIES and their transitive imports within the package, with each package's __init__.py."""
    todo, seen = list(ENTRIES), set()
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        todo += sorted(_own_imports(rel) - seen)
        parent = Path(rel).parent
        while True:
            init = (parent / "__init__.py").as_posix()
            if init not in seen:
                todo.append(init)
            if parent == Path("."):
                break
            parent = parent.parent
    return sorted(seen, key=lambda m: (m.count("/"), m))


def upstream_module(name: str) -> str:
    text = (PKG / name).read_text()
    text = re.sub(r"\bsglang_kvmul\b", "sglang.srt.managers.kvmul", text)
    header = f"# Generated from sglang-kvmul's sglang_kvmul/{name} by patches/make_patch.py; edit it there.\n"
    return header + text


def _diff(path: str, old: str, new: str) -> str:
    a = f"a/python/{path}" if old else "/dev/null"
    lines = difflib.unified_diff(
        old.splitlines(keepends=True), new.splitlines(keepends=True), fromfile=a, tofile=f"b/python/{path}", n=3
    )
    body = "".join(lines)
    mode = "" if old else "new file mode 100644\n"
    return f"diff --git a/python/{path} b/python/{path}\n{mode}{body}"


def build_patch() -> str:
    parts = []
    for path, edits in EDITS.items():
        old = pristine(path)
        new = old
        for anchor, replacement in edits:
            if new.count(anchor) != 1:
                raise SystemExit(f"{path}: anchor found {new.count(anchor)} times: {anchor!r}")
            new = new.replace(anchor, replacement)
        parts.append(_diff(path, old, new))
    for name in modules():
        parts.append(_diff(f"{TARGET_PKG}/{name}", "", upstream_module(name)))
    return "".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="fail if the committed patch is not current")
    args = ap.parse_args()
    patch = build_patch()
    if args.check:
        current = PATCH.exists() and PATCH.read_text() == patch
        print(f"{PATCH.name}: {'current' if current else 'STALE (run patches/make_patch.py)'}")
        return 0 if current else 1
    PATCH.write_text(patch)
    print(f"wrote {PATCH} ({len(patch.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
