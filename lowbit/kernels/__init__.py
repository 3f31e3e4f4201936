"""Optional fast paths. Each is pinned by tests/test_kernels.py, bit for bit, to
the pure-torch reference it replaces, and none is the only implementation:
a kernel returns None where it does not apply and the caller runs the reference.
"""
from .encode import encode_nearest

__all__ = ["encode_nearest"]
