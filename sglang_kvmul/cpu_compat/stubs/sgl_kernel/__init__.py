"""Pure-Python stand-in for the sgl-kernel CPU build (not on PyPI). CPU-only compatibility code.

It registers no `torch.ops.sgl_kernel.*` op, so SGLang detects no AMX support and uses its
native-torch fallbacks. Any other name imports fine and fails loudly only if called.
"""

import ctypes

__version__ = "0.0.0+cpustub"


def copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc):
    """Copy KV rows src_loc[i] -> tgt_loc[i] in every layer buffer (raw base pointer + row stride)."""
    ptrs, strd, tgt, src = data_ptrs.tolist(), strides.tolist(), tgt_loc.tolist(), src_loc.tolist()
    for base, stride in zip(ptrs, strd, strict=False):
        for s, t in zip(src, tgt, strict=False):
            ctypes.memmove(base + t * stride, base + s * stride, stride)


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def _missing(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel CPU stand-in: {name} is not implemented")

    _missing.__name__ = name
    return _missing
