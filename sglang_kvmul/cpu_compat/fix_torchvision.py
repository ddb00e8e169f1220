"""Setup-time fix (CPU only): let PyPI's CUDA-linked torchvision import on a CPU-only torch.

torchvision's `_meta_registrations.py` calls `torch.library.register_fake("torchvision::nms")`
unconditionally; without its CUDA `_C.so` that op does not exist and the import fails. SGLang
imports torchvision unconditionally. Make the two registrations go through torchvision's own
conditional `register_meta`. Idempotent.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

_PATTERN = re.compile(r'^@torch\.library\.register_fake\("torchvision::(q?nms)"\)', re.M)


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        print("torchvision not installed; nothing to fix")
        return 0
    path = Path(spec.submodule_search_locations[0]) / "_meta_registrations.py"
    text = path.read_text()
    fixed, n = _PATTERN.subn(r'@register_meta("\1")', text)
    if n:
        path.write_text(fixed)
    print(f"torchvision: {n} registration(s) made conditional in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
