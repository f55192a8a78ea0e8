"""Bit contract constants (v1.1) and the library seed generator.

The random-stream ids live once, in ``kernels/srk_round.h``; this module reads them from there,
and everything else (the package, the NumPy reference, the tests) takes them from ``STREAMS``.
"""
from __future__ import annotations

import math
import re
import secrets
import threading
from typing import Any

import numpy as np

from ._build import header_defines

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

STREAMS: dict[str, int] = {
    name.removeprefix("SRK_STREAM_").lower(): value
    for name, value in header_defines("srk_round.h").items() if name.startswith("SRK_STREAM_")
}
"""Random-stream ids by purpose: cast, param, exp_avg, exp_avg_sq, compensation, collective, wire,
param_fp16 (fp16-sr's FP16 weights)."""

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
    # One raw PCG64 output: the same number integers(0, 2**64, dtype=uint64) returns (over the
    # full range it takes one raw draw as it is), at 0.4 us instead of 4.6 (srkern.cast draws one
    # per call without a seed).
    with _gen_lock:
        return int(_gen.bit_generator.random_raw())


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


# The smallest normal FP32 magnitude. Scalars are rounded to FP32 on the host, where the caller's
# floating-point mode applies (torch.set_flush_denormal(True) turns a subnormal result into 0), so
# a scalar that would be subnormal in FP32 is refused instead: no host rounding depends on the mode.
FP32_MIN_NORMAL = 2.0 ** -126


def check_f32(name: str, value: Any, lo: float, lo_open: bool = False, hi: float | None = None) -> float:
    """``value`` as a float that is finite also in FP32 (the kernels' precision), in range, and
    zero or normal in FP32."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        v = float(value)
    except OverflowError:  # an int beyond float64's range: beyond FP32's too
        v = math.inf
    with np.errstate(over="ignore"):
        finite32 = math.isfinite(v) and math.isfinite(float(np.float32(v)))
    bad = not finite32 or v < lo or (lo_open and v == lo) or (hi is not None and v >= hi)
    if bad:
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'})"
        raise ValueError(f"{name} must be finite (in FP32) and in {rng}, got {value!r}")
    if v != 0.0 and abs(v) < FP32_MIN_NORMAL:
        raise ValueError(f"{name}={value!r} is below FP32's smallest normal number (2**-126): "
                         "it would be subnormal or zero in the kernel")
    return v
