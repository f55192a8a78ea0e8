"""Bit contract constants (v1.1) and the library seed generator.

The random-stream ids live once, in ``kernels/srk_round.h``; this module reads them from there,
and everything else (the package, the NumPy reference, the tests) takes them from ``STREAMS``.
"""
from __future__ import annotations

import re
import secrets
import threading

import numpy as np

from ._build import KERNEL_DIR

CONTRACT_VERSION = "1.1"
"""The bit contract this srkern implements, "major.minor". v1.1 = v1 (Philox layout, streams,
rounding rules: every random bit and every rounding unchanged) plus: every NaN that arithmetic
produces (AdamW's stored buffers, reduce-scatter sums, grad_norm's partials) is one canonical
quiet NaN per format (FP32 0x7fc00000, BF16 0x7fc0, FP64 0x7ff8000000000000), and subnormals are
never flushed whatever the caller's floating-point state. A minor version keeps every draw, so
state written under any 1.x loads here; a new major version would not."""


def contract_major(version) -> int:
    """The major number of a contract version as written in checkpoints: 1, "1" or "1.1" -> 1.

    Raises ValueError for anything else (a bool, a float, a malformed string)."""
    if isinstance(version, int) and not isinstance(version, bool) and version >= 0:
        return version
    if isinstance(version, str) and re.fullmatch(r"\d+(\.\d+)?", version):
        return int(version.split(".")[0])
    raise ValueError(f"not a bit contract version: {version!r}")


def contract_compatible(version) -> bool:
    """Whether state written under contract ``version`` (int or "major.minor") loads here:
    the same major version. Malformed versions are not compatible."""
    try:
        return contract_major(version) == contract_major(CONTRACT_VERSION)
    except ValueError:
        return False

_STREAM_RE = re.compile(r"#define\s+SRK_STREAM_(\w+)\s+(\d+)u")
STREAMS: dict[str, int] = {
    m.group(1).lower(): int(m.group(2))
    for m in _STREAM_RE.finditer((KERNEL_DIR / "srk_round.h").read_text())
}
"""Random-stream ids by purpose: cast, param, exp_avg, exp_avg_sq, compensation, collective, wire."""

U64 = 1 << 64
U32 = 1 << 32

_gen_lock = threading.Lock()
_gen = np.random.Generator(np.random.PCG64(secrets.randbits(128)))


def manual_seed(n: int) -> None:
    """Seed the generator that ``seed=None`` calls draw their 64-bit seeds from."""
    global _gen
    check_u64("seed", n)
    with _gen_lock:
        _gen = np.random.Generator(np.random.PCG64(n))


def next_seed() -> int:
    """A fresh 64-bit seed from the library generator (see :func:`manual_seed`)."""
    with _gen_lock:
        return int(_gen.integers(0, U64, dtype=np.uint64))


def check_u64(name: str, value, limit: int = U64) -> int:
    """``value`` as a Python int in [0, limit), else a ValueError/TypeError naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if not 0 <= value < limit:
        bound = f"2**{limit.bit_length() - 1}" if limit & (limit - 1) == 0 else str(limit)
        raise ValueError(f"{name} must be in [0, {bound}), got {value}")
    return value


def check_offset(name: str, value, n: int) -> int:
    """A logical offset for ``n`` elements: an integer with ``offset + n <= 2**64``, and below
    2**64 even when ``n`` is 0 (the same bound on every backend; the kernels take a uint64)."""
    return check_u64(name, value, U64 - max(n, 1) + 1)


def resolve_seed(seed) -> int:
    return next_seed() if seed is None else check_u64("seed", seed)
