"""llama.cpp's intermediate tensors by name (`attn_norm-0`, `ffn_gate-3`, `l_out-29`,
`result_output`, ...), read through its graph evaluation callback (`cb_eval`).

The callback receives ggml's `struct ggml_tensor`; `_GGMLTensor` mirrors its layout in
ggml.h of the llama.cpp that llama-cpp-python 0.3.x vendors (checked against 0.3.36). Only
contiguous float32 tensors are copied out, as arrays in numpy order ([ne3, ne2, ne1, ne0]).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

GGML_TYPE_F32 = 0


class _GGMLTensor(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


class TappedLlama:
    """A `llama_cpp.Llama` whose every evaluation records its float32 tensors in `tensors`
    (name -> array of the last evaluation that computed it)."""

    def __init__(self, path: str | Path, **kwargs):
        import llama_cpp
        import llama_cpp.llama as llama_module

        self.tensors: dict[str, np.ndarray] = {}
        self._callback = llama_cpp.ggml_backend_sched_eval_callback(self._record)
        default = llama_module.llama_cpp.llama_context_default_params

        def with_callback():
            params = default()
            params.cb_eval = self._callback
            return params

        # Llama() builds its context params from this function; swap it in for the call only.
        llama_module.llama_cpp.llama_context_default_params = with_callback
        try:
            self.llama = llama_cpp.Llama(str(path), verbose=False, **kwargs)
        finally:
            llama_module.llama_cpp.llama_context_default_params = default

    def _record(self, tensor, ask: bool, user_data) -> bool:
        if ask:
            return True  # "yes, show me this node once it is computed"
        t = ctypes.cast(tensor, ctypes.POINTER(_GGMLTensor)).contents
        ne, nb = list(t.ne), list(t.nb)
        contiguous = nb[0] == 4 and nb[1] == 4 * ne[0] and nb[2] == nb[1] * ne[1]
        if t.type == GGML_TYPE_F32 and contiguous and t.data:
            n = ne[0] * ne[1] * ne[2] * ne[3]
            ptr = ctypes.cast(t.data, ctypes.POINTER(ctypes.c_float))
            values = np.ctypeslib.as_array(ptr, shape=(n,)).copy()
            self.tensors[t.name.decode()] = values.reshape(ne[3], ne[2], ne[1], ne[0])
        return True

    def eval(self, ids: list[int]) -> dict[str, np.ndarray]:
        """Run `ids` from an empty cache; the tensors of that pass."""
        self.tensors.clear()
        self.llama.reset()
        self.llama.eval(ids)
        return self.tensors
