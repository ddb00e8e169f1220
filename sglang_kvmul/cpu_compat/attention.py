"""CPU only: the method SGLang 0.5.23's torch-native attention backend lacks for attention DP.

`ForwardBatch._pad_inputs_to_size` (attention DP's MLP-sync padding) asks the attention backend
for `get_cpu_graph_seq_len_fill_value()`; only the Intel AMX backend has it (it returns 1, the
sequence length a padded slot gets). Without it the first attention-DP forward on CPU raises.
"""

from __future__ import annotations


def install() -> bool:
    """Give TorchNativeAttnBackend the AMX backend's answer; True if it was missing."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    if hasattr(TorchNativeAttnBackend, "get_cpu_graph_seq_len_fill_value"):
        return False
    TorchNativeAttnBackend.get_cpu_graph_seq_len_fill_value = lambda self: 1
    return True
