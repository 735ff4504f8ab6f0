"""ggml itself, through llama-cpp-python's shared library libggml-base (a test dependency): the
reference the block encoders are checked against, in the tests and in benchmarks/kernel_speed.py."""

from __future__ import annotations

import ctypes
import functools
import importlib.util
from pathlib import Path

import numpy as np

from llama4_quant.formats import gguf_quants as gq

TYPES = ("Q8_0", "Q4_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS")


def _load_ggml():
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        path = Path(spec.origin).parent / "lib" / name
        if path.exists():
            try:
                lib = ctypes.CDLL(str(path))
            except OSError:
                return None
            for qtype in TYPES:
                f = getattr(lib, _function(qtype))
                f.restype = ctypes.c_size_t
                f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
            return lib
    return None


def _function(qtype: str) -> str:
    name = "quantize_" + qtype.lower()  # quantize_q8_0, quantize_iq4_nl, but quantize_q4_K
    return name[:-2] + "_K" if qtype.endswith("_K") else name


GGML = _load_ggml()


def needs_ggml(test):
    """Fail (not skip) a test whose reference, libggml, is missing."""
    def run(*args, **kwargs):
        assert GGML is not None, "llama-cpp-python's libggml-base is missing: pip install -e '.[test]'"
        return test(*args, **kwargs)

    return functools.wraps(test)(run)


def ggml_quantize(x: np.ndarray, qtype: str, importance: np.ndarray | None = None) -> np.ndarray:
    """ggml's quantize_<type> on the rows of x (one thread), as bytes [rows, row bytes]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    block = gq.block_type(qtype)
    out = np.zeros((x.shape[0], x.shape[1] // block.block_size * block.type_size), dtype=np.uint8)
    qw = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    getattr(GGML, _function(qtype))(x.ctypes.data, out.ctypes.data, x.shape[0], x.shape[1],
                                    None if qw is None else qw.ctypes.data)
    return out
