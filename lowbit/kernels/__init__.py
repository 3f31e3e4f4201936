"""Optional fast paths. Each is pinned by tests/test_kernels.py, bit for bit, to
the pure-torch reference it replaces, and none is the only implementation:
a kernel returns None where it does not apply and the caller runs the reference.
"""
from . import compiled
from .compiled import quantize_fused
from .encode import encode_nearest

__all__ = ["compiled", "encode_nearest", "quantize_fused"]
