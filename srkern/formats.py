"""The floating-point formats srkern rounds to: the one table that the package, the NumPy oracle,
the tests, the benchmarks and ``gpu_check`` read (a new format is one row here plus its kernels).

Every value is a fact of the format itself (IEEE-style layout, the ml_dtypes scalar type) or of
contract v1 (the width of the random draw and so the elements per Philox block: 8 lanes of 16
bits for BF16, 4 of 32 bits for the others; ``kernels/cast.cu`` states the same).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np


@dataclass(frozen=True)
class Format:
    """One 16- or 8-bit target format."""
    name: str         # canonical name (NumPy / ml_dtypes / torch spelling): "bfloat16"
    short: str        # kernel-name suffix and test id: "bf16" (cast_f32_bf16_sr)
    np_type: Any      # NumPy / ml_dtypes scalar type
    uint: Any         # unsigned integer type of the same width (bit views, CuPy's FP8 carrier)
    mantissa: int     # stored mantissa bits
    emin: int         # exponent of the smallest normal number
    has_inf: bool     # False for float8_e4m3fn (overflow gives NaN)
    draw_bits: int    # width of one random draw (contract v1)

    @property
    def block(self) -> int:
        """Elements per Philox block: 128 random bits / ``draw_bits``."""
        return 128 // self.draw_bits

    @property
    def nbits(self) -> int:
        return np.dtype(self.uint).itemsize * 8

    @property
    def itemsize(self) -> int:
        return np.dtype(self.uint).itemsize

    @property
    def max(self) -> float:
        """Largest finite value."""
        return float(ml_dtypes.finfo(self.np_type).max)

    @property
    def smallest_subnormal(self) -> float:
        return float(ml_dtypes.finfo(self.np_type).smallest_subnormal)


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("bfloat16", "bf16", ml_dtypes.bfloat16, np.uint16, 7, -126, True, 16),
    Format("float16", "f16", np.float16, np.uint16, 10, -14, True, 32),
    Format("float8_e4m3fn", "e4m3", ml_dtypes.float8_e4m3fn, np.uint8, 3, -6, False, 32),
    Format("float8_e5m2", "e5m2", ml_dtypes.float8_e5m2, np.uint8, 2, -14, True, 32),
)}
"""The rounding targets, by canonical name, in the order tests and benchmarks list them."""

FORMATS_BY_SHORT: dict[str, Format] = {f.short: f for f in FORMATS.values()}
FP8_DTYPES = tuple(name for name in FORMATS if name.startswith("float8"))
FLOAT_DTYPES = ("float32", *FORMATS)  # what srkern.cast reads and writes

KERNEL_SUFFIX: dict[str, str] = {"float32": "f32", **{f.name: f.short for f in FORMATS.values()}}
"""The dtype part of kernel names (``cast_f32_bf16_sr``, ``adamw_bf16_sr_gf32_sbf16``) and of test ids."""

NP_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    **{f.name: np.dtype(f.np_type) for f in FORMATS.values()},
}
"""NumPy dtype of every float dtype srkern handles (ml_dtypes for BF16 and FP8)."""

_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
            "float": "float32", "e4m3": "float8_e4m3fn", "e4m3fn": "float8_e4m3fn",
            "fp8_e4m3fn": "float8_e4m3fn", "e5m2": "float8_e5m2", "fp8_e5m2": "float8_e5m2"}


def dtype_name(dtype: Any) -> str:
    """Canonical name of a dtype given as a string, torch dtype, NumPy or ml_dtypes dtype."""
    if isinstance(dtype, str):
        name = dtype.lower().removeprefix("torch.")
        return _ALIASES.get(name, name)
    text = str(dtype)
    if text.startswith("torch."):
        return text.removeprefix("torch.")
    try:
        return np.dtype(dtype).name
    except TypeError:
        return text
