"""Plain NumPy implementation of srkern's contracts: the test oracle, not a backend.

Written for clarity over speed: Philox rounds as in Random123, and rounding by the definition in
the contract (truncate onto the grid, compare the scaled remainder with the draw) using
float64/integer arithmetic rather than the kernels' bit tricks, so that the two can disagree if
either is wrong. The facts it shares with the package rather than re-deriving (the format table,
the stream ids read from ``kernels/srk_round.h``, the flat layout) are
imported from their one home; every formula, including the AdamW host scalars, is its own.
"""
from __future__ import annotations

import math

import numpy as np

from ._contract import STREAMS
from .formats import FORMATS, dtype_name
from .layout import flat_offsets

M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = np.uint64(0xFFFFFFFF)

def philox4x32_10(ctr: np.ndarray, key: tuple[int, int]) -> np.ndarray:
    """Philox4x32-10 on an (n, 4) uint32 counter array with a 2-word key; returns (n, 4) uint32."""
    c = [np.asarray(ctr[:, i], dtype=np.uint64) for i in range(4)]
    k0, k1 = key[0] & 0xFFFFFFFF, key[1] & 0xFFFFFFFF
    for rnd in range(10):
        if rnd:
            k0, k1 = (k0 + W0) & 0xFFFFFFFF, (k1 + W1) & 0xFFFFFFFF
        p0, p1 = M0 * c[0], M1 * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & MASK32
        c = [hi1 ^ c[1] ^ np.uint64(k0), lo1, hi0 ^ c[3] ^ np.uint64(k1), lo0]
    return np.stack(c, axis=1).astype(np.uint32)


def blocks(q: np.ndarray, seed: int, step: int, stream: int) -> np.ndarray:
    """The four words of Philox block ``q`` (uint64 array) under contract v1."""
    q = np.asarray(q, dtype=np.uint64)
    ctr = np.stack([q & MASK32, q >> np.uint64(32), np.full_like(q, step & 0xFFFFFFFF),
                    np.full_like(q, stream & 0xFFFFFFFF)], axis=1)
    return philox4x32_10(ctr, (seed & 0xFFFFFFFF, seed >> 32))


def draws16(index: np.ndarray, seed: int, step: int, stream: int) -> np.ndarray:
    """16-bit draws for logical indices (BF16 targets): block index // 8, lane index % 8."""
    index = np.asarray(index, dtype=np.uint64)
    w = blocks(index // np.uint64(8), seed, step, stream)
    lane = (index % np.uint64(8)).astype(np.int64)
    word = w[np.arange(len(index)), lane // 2].astype(np.uint64)
    return ((word >> (16 * (lane % 2)).astype(np.uint64)) & np.uint64(0xFFFF)).astype(np.uint32)


def draws32(index: np.ndarray, seed: int, step: int, stream: int) -> np.ndarray:
    """32-bit draws for logical indices (FP16 / FP8 targets): block index // 4, word index % 4."""
    index = np.asarray(index, dtype=np.uint64)
    w = blocks(index // np.uint64(4), seed, step, stream)
    return w[np.arange(len(index)), (index % np.uint64(4)).astype(np.int64)]


# ---- rounding ----------------------------------------------------------------------------------


def _grid(a: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """(T, quantum) for finite |x| = a (float64): T = a truncated onto the format's grid."""
    mant, emin = FORMATS[fmt].mantissa, FORMATS[fmt].emin
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    # log2 can be off by one at binade edges in float64; fix with an exact comparison.
    e = np.where(np.exp2(e) > a, e - 1, e)
    e = np.where(np.exp2(e + 1) <= a, e + 1, e)
    quantum = np.exp2(np.maximum(e, emin) - mant)
    return np.floor(a / quantum) * quantum, quantum


def round_float32(x: np.ndarray, fmt: str, rounding: str = "stochastic", *, seed: int = 0,
                  offset: int = 0, step: int = 0, stream: int = 0, saturate: bool = False) -> np.ndarray:
    """Contract v1 rounding of a float32 array (C order) into ``fmt``; returns the ml_dtypes array."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    f = FORMATS[fmt]
    fmax, has_inf, bits, npt = f.max, f.has_inf, f.draw_bits, f.np_type
    n = x.size
    with np.errstate(invalid="ignore"):  # signalling NaNs widen quietly; handled below
        a = np.abs(x.astype(np.float64))
    finite = np.isfinite(x)
    af = np.where(finite, a, 0.0)
    t, quantum = _grid(af, fmt)
    d = (af - t) / quantum  # exact: both are short binary fractions
    if rounding == "stochastic":
        index = np.uint64(offset) + np.arange(n, dtype=np.uint64)
        r = (draws16 if bits == 16 else draws32)(index, seed, step, stream).astype(np.float64)
        up = np.floor(d * 2.0 ** bits) + r >= 2.0 ** bits
    else:
        units = t / quantum
        up = (d > 0.5) | ((d == 0.5) & (np.mod(units, 2) == 1))
    mag = t + np.where(up, quantum, 0.0)
    over = mag > fmax
    if saturate:
        over_val = fmax
    else:
        over_val = np.inf if has_inf else np.nan
    mag = np.where(over, over_val, mag)
    out = np.copysign(mag, np.where(np.signbit(x), -1.0, 1.0))
    out = np.where(np.isinf(x), (np.copysign(np.inf, x) if has_inf else
                                 np.copysign(fmax if saturate else np.nan, x)), out)
    out = np.where(np.isnan(x), np.nan, out)
    res = out.astype(npt)  # every value is representable: this conversion is exact
    # NaN: keep the input's sign (ml_dtypes' float64 -> format conversion drops it).
    if np.isnan(x).any():
        u = res.view(f.uint).copy()
        sign_bit = 1 << (f.nbits - 1)
        neg_nan = np.isnan(x) & np.signbit(x)
        u[np.isnan(x)] &= ~np.array(sign_bit, dtype=u.dtype)
        u[neg_nan] |= np.array(sign_bit, dtype=u.dtype)
        if fmt == "bfloat16":  # contract v1: BF16 NaN keeps its top payload bits, made quiet
            nan_in = x.view(np.uint32)[np.isnan(x)]
            u[np.isnan(x)] = ((nan_in >> 16) | 0x0040).astype(np.uint16)
        res = u.view(npt)
    return res


def upcast(x: np.ndarray) -> np.ndarray:
    """Exact widening of a 16/8-bit float array to float32."""
    return np.asarray(x).astype(np.float32)


# ---- canonical NaNs (contract v1.1) ---------------------------------------------------------------
# Casts keep the NaN rules above (sign and payload kept). Every NaN that *arithmetic* produces
# (AdamW's stored buffers, reduce-scatter sums, grad_norm's partials) is one positive quiet NaN
# per format, whatever NaNs went in. Here it is applied to the finished values, by bit pattern.

CANONICAL_NAN = {"float32": 0x7FC00000, "bfloat16": 0x7FC0, "float16": 0x7E00, "float64": 0x7FF8000000000000}
_UINT_OF = {"float32": np.uint32, "bfloat16": np.uint16, "float16": np.uint16, "float64": np.uint64}


def canonical_nan(a) -> np.ndarray:
    """A copy of float32 / bfloat16 / float16 / float64 array ``a`` with every NaN made the canonical one."""
    a = np.array(a, copy=True)
    name = dtype_name(a.dtype)
    bits = a.view(_UINT_OF[name])
    with np.errstate(invalid="ignore"):  # isnan of a signalling NaN may raise "invalid"
        bits[np.isnan(a)] = CANONICAL_NAN[name]
    return a


# ---- distributed: reduce-scatter (srkern.dist) --------------------------------------------------
# The whole reduced vector in one process, for comparison with the concatenated shards of a run
# on `len(xs)` ranks: sum in FP32 in rank order, optional division by the world size, then one
# contract-v1 rounding with each element's position in the full vector as its index; a NaN result
# is the canonical NaN of the output format (v1.1).

def reduce_scatter_full(xs: list[np.ndarray], op: str = "avg", out_dtype: str = "bfloat16",
                        rounding: str = "stochastic", *, seed: int = 0, step: int = 0,
                        stream: int = STREAMS["collective"], wire_dtype: str | None = None) -> np.ndarray:
    """Reduce-scatter of the per-rank vectors ``xs`` (rank order), all shards concatenated."""
    world = len(xs)
    n = np.asarray(xs[0]).size
    wire = []
    for r, x in enumerate(xs):
        x = np.asarray(x).reshape(-1)
        if wire_dtype == "bfloat16" and x.dtype == np.float32:
            x = round_float32(x, "bfloat16", seed=seed, offset=r * n, step=step,
                             stream=STREAMS["wire"])
        wire.append(x.astype(np.float32))
    acc = wire[0].copy()
    with np.errstate(invalid="ignore", over="ignore"):  # NaN and Inf inputs are part of the contract
        for x in wire[1:]:
            acc = (acc + x).astype(np.float32)  # one FP32 rounding per addition, rank order
        if op == "avg":
            acc = (acc / np.float32(world)).astype(np.float32)
    if out_dtype == "float32":
        return canonical_nan(acc)  # v1.1: a NaN sum is the canonical NaN
    return canonical_nan(round_float32(acc, "bfloat16", rounding, seed=seed, step=step, stream=stream))


# ---- AdamW (srkern.adamw_step) ------------------------------------------------------------------
# The six precision modes of kernels/adamw.cu, written out with NumPy float32 operations in the
# kernel's documented order (NumPy's float32 +, *, / and sqrt are single IEEE operations, never
# fused), and BF16 and FP16 writes through round_float32 above with each element's logical flat
# index (FP16, fp16-sr's weights: the contract's 32-bit draws, as a cast to float16 takes them).
# Every stored buffer then goes through canonical_nan (v1.1: NaN results are canonical).


def adamw_scalars(step: int, lr: float, betas: tuple[float, float], eps: float,
                  weight_decay: float) -> dict[str, np.float32]:
    """The step's host scalars as kernels/adamw.cu's header comment defines them, each evaluated
    in float64 (Python floats) from the hyper-parameters and rounded to FP32 once:
    omb1 = 1 - beta1, omb2 = 1 - beta2, step_size = lr / (1 - beta1^step),
    inv_sqrt_bc2 = 1 / sqrt(1 - beta2^step), decay = 1 - lr * weight_decay, lrwd = lr * weight_decay.
    (Range checks are the package's business; the oracle only computes.)"""
    beta1, beta2 = float(betas[0]), float(betas[1])
    lr, wd = float(lr), float(weight_decay)
    in_float64 = {
        "b1": beta1, "omb1": 1.0 - beta1,
        "b2": beta2, "omb2": 1.0 - beta2,
        "step_size": lr / (1.0 - beta1 ** step),
        "inv_sqrt_bc2": 1.0 / math.sqrt(1.0 - beta2 ** step),
        "eps": float(eps),
        "decay": 1.0 - lr * wd,
        "lrwd": lr * wd,
    }
    return {name: np.float32(value) for name, value in in_float64.items()}


def adamw_step(params, grads, exp_avgs, exp_avg_sqs, *, step: int, lr: float,
               betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
               precision: str = "bf16-sr", master_params=None, compensation=None,
               grad_scale: float = 1.0, seed: int = 0, offsets=None) -> dict[str, list]:
    """One AdamW step on lists of NumPy arrays (BF16 as ml_dtypes); returns the new buffers.

    Keys: ``params``, ``exp_avgs``, ``exp_avg_sqs``, ``master_params``, ``compensation`` (the
    last two None when the mode has none). Inputs are not modified.
    """
    s = adamw_scalars(step, lr, betas, eps, weight_decay)
    f32 = np.float32
    if offsets is None:
        offsets = flat_offsets([np.asarray(p).size for p in params])
    sr = precision in ("bf16-sr", "bf16-kahan", "fp16-sr")
    out = {"params": [], "exp_avgs": [], "exp_avg_sqs": [],
           "master_params": [] if precision == "fp32-master" else None,
           "compensation": [] if precision == "bf16-kahan" else None}

    def store_bf16(x, off, stream, stochastic):
        return round_float32(x, "bfloat16", "stochastic" if stochastic else "nearest",
                             seed=seed, offset=off, step=step, stream=stream)

    with np.errstate(all="ignore"):
        for t, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, strict=True)):
            shape, off = np.shape(p), int(offsets[t])
            p32 = np.asarray(p).astype(f32).reshape(-1)
            g32 = np.asarray(g).astype(f32).reshape(-1) * f32(grad_scale)
            m32 = s["b1"] * np.asarray(m).astype(f32).reshape(-1) + s["omb1"] * g32
            v32 = s["b2"] * np.asarray(v).astype(f32).reshape(-1) + s["omb2"] * (g32 * g32)
            d = np.sqrt(v32) * s["inv_sqrt_bc2"] + s["eps"]
            u = (s["step_size"] * m32) / d
            state_bf16 = dtype_name(np.asarray(m).dtype) == "bfloat16"
            for key, x, stream in (("exp_avgs", m32, STREAMS["exp_avg"]), ("exp_avg_sqs", v32, STREAMS["exp_avg_sq"])):
                stored = store_bf16(x, off, stream, sr) if state_bf16 else x.astype(f32)
                out[key].append(canonical_nan(stored).reshape(shape))
            if precision == "fp32-master":
                w = np.asarray(master_params[t]).astype(f32).reshape(-1) * s["decay"] - u
                out["master_params"].append(canonical_nan(w).reshape(shape))
                out["params"].append(canonical_nan(store_bf16(w, off, STREAMS["param"], False)).reshape(shape))
            elif precision == "bf16-kahan":
                c = np.asarray(compensation[t]).astype(f32).reshape(-1)
                y = ((-s["lrwd"]) * p32 - u) + c
                pn = canonical_nan(store_bf16(p32 + y, off, STREAMS["param"], False))
                c_new = y - (pn.astype(f32) - p32)
                out["params"].append(pn.reshape(shape))
                out["compensation"].append(
                    canonical_nan(store_bf16(c_new, off, STREAMS["compensation"], True)).reshape(shape))
            else:
                pn = p32 * s["decay"] - u
                if precision == "fp32":
                    out["params"].append(canonical_nan(pn.astype(f32)).reshape(shape))
                elif precision == "fp16-sr":
                    out["params"].append(canonical_nan(round_float32(
                        pn, "float16", "stochastic", seed=seed, offset=off, step=step,
                        stream=STREAMS["param_fp16"])).reshape(shape))
                else:
                    out["params"].append(canonical_nan(
                        store_bf16(pn, off, STREAMS["param"], precision == "bf16-sr")).reshape(shape))
    return out


def adamw_float64(p, g, m, v, *, step: int, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                  weight_decay: float = 0.0) -> np.ndarray:
    """The exact-arithmetic (float64) AdamW weight after one step: the target SR is unbiased for."""
    b1, b2 = betas
    p, g, m, v = (np.asarray(a, dtype=np.float64) for a in (p, g, m, v))
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    d = np.sqrt(v / (1 - b2 ** step)) + eps
    return p * (1 - lr * weight_decay) - lr / (1 - b1 ** step) * m / d


# ---- gradient norm (srkern.grad_norm) -------------------------------------------------------------
# The layout of the partial sums, stated here on its own (tests check these numbers against the
# kernel's #defines): per tensor, spans of NORM_THREADS partials x NORM_CHUNK elements; partial
# l of a span adds, row k = 0, 1, ... in order, the NORM_LANES elements
# span_start + NORM_THREADS*NORM_LANES*k + NORM_LANES*l + e into one FP64 accumulator per lane e,
# then ((a0+a1)+(a2+a3))+((a4+a5)+(a6+a7)); the host adds all partials left to right.

NORM_LANES, NORM_THREADS, NORM_CHUNK = 8, 32, 2048


def grad_sumsq_partials(grads, grad_scale: float = 1.0) -> np.ndarray:
    """The FP64 partial sums of squares of ``grads`` (each element times ``grad_scale`` in FP32)."""
    span = NORM_THREADS * NORM_CHUNK
    rows = NORM_CHUNK // NORM_LANES
    parts = []
    with np.errstate(all="ignore"):
        for g in grads:
            x = np.asarray(g).astype(np.float32).reshape(-1) * np.float32(grad_scale)  # FP32 product
            nspans = -(-x.size // span)
            sq = np.zeros(nspans * span)  # padding: adding +0.0 leaves an accumulator unchanged
            x64 = x.astype(np.float64)
            sq[:x.size] = x64 * x64
            sq = sq.reshape(nspans, rows, NORM_THREADS, NORM_LANES)
            acc = np.zeros((nspans, NORM_THREADS, NORM_LANES))
            for k in range(rows):  # one FP64 addition per row, in row order
                acc = acc + sq[:, k]
            a = [acc[..., e] for e in range(NORM_LANES)]
            tree = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
            parts.append(tree.reshape(-1))
    out = np.concatenate(parts) if parts else np.zeros(0)
    return canonical_nan(out)


def grad_norm(grads, grad_scale: float = 1.0) -> tuple[float, bool]:
    """(norm, finite) as srkern.grad_norm computes them: the partials added left to right."""
    total = 0.0
    for p in grad_sumsq_partials(grads, grad_scale).tolist():
        total += p
    if math.isnan(total):
        return math.nan, False
    return math.sqrt(total), math.isfinite(total)


# ---- SR accumulation (srkern.add_) ------------------------------------------------------------------
# acc + alpha * x in float32 (two IEEE operations, no fused multiply-add), then the cast oracle's
# rounding into acc's format at logical indices offset + C-order position, stream "accum"; a NaN
# sum is the canonical NaN of acc's format (v1.1: arithmetic, not a cast).

def add_(acc, x, *, alpha: float = 1.0, rounding: str = "stochastic", seed: int = 0, offset: int = 0,
         step: int = 0) -> np.ndarray:
    """What srkern.add_(acc, x, ...) leaves in ``acc`` (BF16 / FP16), as a new array; inputs unchanged."""
    a = np.asarray(acc)
    fmt = dtype_name(a.dtype)
    with np.errstate(all="ignore"):
        s = (a.astype(np.float32).reshape(-1)
             + np.float32(alpha) * np.asarray(x).astype(np.float32).reshape(-1))
    out = round_float32(s, fmt, rounding, seed=seed, offset=offset, step=step, stream=STREAMS["accum"])
    return canonical_nan(out).reshape(a.shape)


# ---- SGD and Lion (srkern.sgd_step, srkern.lion_step) ---------------------------------------------
# kernels/sgd.cu and kernels/lion.cu written out with NumPy float32 operations in their documented
# order. The weight side of every mode (kernels/srk_modes.h) written out once more, on its own:
# p' = p * decay - u; fp32-master on the FP32 master, the BF16 copy to nearest; bf16-kahan
# y = (-lrwd * p - u) + c, p' = rn(p + y), c' = SR(y - (p' - p)); BF16 states SR-rounded from
# stream exp_avg in bf16-sr / bf16-kahan. Each returns the new buffers (inputs not modified).


def _elementwise_step(lane, params, grads, states, *, precision, decay, lrwd, master_params,
                      compensation, seed, step, offsets):
    """The shared driver: ``lane(g32, x32, s32) -> (u, s32')`` per tensor (``s32`` None
    without state); returns params, states, master_params, compensation lists."""
    f32 = np.float32
    if offsets is None:
        offsets = flat_offsets([np.asarray(p).size for p in params])
    sr = precision in ("bf16-sr", "bf16-kahan")
    out = {"params": [], "states": [] if states is not None else None,
           "master_params": [] if precision == "fp32-master" else None,
           "compensation": [] if precision == "bf16-kahan" else None}

    def bf16(x, off, stream, stochastic):
        return canonical_nan(round_float32(x, "bfloat16", "stochastic" if stochastic else "nearest",
                                           seed=seed, offset=off, step=step, stream=stream))

    with np.errstate(all="ignore"):
        for t, (p, g) in enumerate(zip(params, grads, strict=True)):
            shape, off = np.shape(p), int(offsets[t])
            x = np.asarray(master_params[t] if precision == "fp32-master" else p).astype(f32).reshape(-1)
            s = None if states is None else np.asarray(states[t]).astype(f32).reshape(-1)
            u, s_new = lane(np.asarray(g).astype(f32).reshape(-1), x, s)
            if states is not None:
                st_bf16 = dtype_name(np.asarray(states[t]).dtype) == "bfloat16"
                kept = bf16(s_new, off, STREAMS["exp_avg"], sr) if st_bf16 else canonical_nan(s_new.astype(f32))
                out["states"].append(kept.reshape(shape))
            if precision == "bf16-kahan":
                c = np.asarray(compensation[t]).astype(f32).reshape(-1)
                y = ((-f32(lrwd)) * x - u) + c
                pn = bf16(x + y, off, STREAMS["param"], False)
                out["params"].append(pn.reshape(shape))
                out["compensation"].append(bf16(y - (pn.astype(f32) - x), off, STREAMS["compensation"], True).reshape(shape))
                continue
            w = (x * f32(decay) - u).astype(f32)
            if precision == "fp32-master":
                out["master_params"].append(canonical_nan(w).reshape(shape))
                out["params"].append(bf16(w, off, STREAMS["param"], False).reshape(shape))
            elif precision == "fp32":
                out["params"].append(canonical_nan(w).reshape(shape))
            else:
                out["params"].append(bf16(w, off, STREAMS["param"], precision == "bf16-sr").reshape(shape))
    return out


def sgd_step(params, grads, momentum_buffers=None, *, lr: float, momentum: float = 0.0,
             dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
             maximize: bool = False, precision: str = "bf16-sr", master_params=None,
             compensation=None, grad_scale: float = 1.0, seed: int = 0, step: int = 1,
             first_step=None, offsets=None) -> dict[str, list]:
    """One SGD step (torch.optim.SGD's order, in FP32). Keys: ``params``, ``momentum_buffers``
    (None without momentum), ``master_params``, ``compensation``. Scalars: lr, momentum,
    1 - dampening and weight_decay each rounded to FP32 from float64."""
    f32 = np.float32
    first = (step == 1) if first_step is None else bool(first_step)
    lr32, mom32, omd32, wd32, gs32 = (f32(v) for v in (lr, momentum, 1.0 - float(dampening), weight_decay, grad_scale))

    def lane(g, x, b):
        g = g * gs32
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g + wd32 * x
        if b is not None:
            b = g.copy() if first else mom32 * b + omd32 * g
            g = g + mom32 * b if nesterov else b
        return lr32 * g, b

    out = _elementwise_step(lane, params, grads, momentum_buffers if momentum != 0 else None,
                            precision=precision, decay=1.0, lrwd=0.0, master_params=master_params,
                            compensation=compensation, seed=seed, step=step, offsets=offsets)
    out["momentum_buffers"] = out.pop("states")
    return out


def lion_step(params, grads, exp_avgs, *, lr: float, betas=(0.9, 0.99), weight_decay: float = 0.0,
              maximize: bool = False, precision: str = "bf16-sr", master_params=None,
              compensation=None, grad_scale: float = 1.0, seed: int = 0, step: int = 1,
              offsets=None) -> dict[str, list]:
    """One Lion step (Chen et al. 2023) in FP32: c = b1*m + (1-b1)*g, p = p*(1 - lr*wd) -
    lr*sign(c), m = b2*m + (1-b2)*g, sign(+-0) = 0 and sign(NaN) = NaN. Keys: ``params``,
    ``exp_avgs``, ``master_params``, ``compensation``."""
    f32 = np.float32
    b1, b2 = float(betas[0]), float(betas[1])
    b1_32, omb1, b2_32, omb2, lr32, gs32 = (f32(v) for v in (b1, 1.0 - b1, b2, 1.0 - b2, lr, grad_scale))

    def lane(g, x, m):
        g = g * gs32
        if maximize:
            g = -g
        c = b1_32 * m + omb1 * g
        sign = np.where(c > 0, f32(1), np.where(c < 0, f32(-1), np.where(np.isnan(c), c, f32(0))))
        return lr32 * sign.astype(f32), b2_32 * m + omb2 * g

    out = _elementwise_step(lane, params, grads, exp_avgs, precision=precision,
                            decay=1.0 - float(lr) * float(weight_decay), lrwd=float(lr) * float(weight_decay),
                            master_params=master_params, compensation=compensation, seed=seed,
                            step=step, offsets=offsets)
    out["exp_avgs"] = out.pop("states")
    return out


def lion_float64(p, g, m, *, lr: float, betas=(0.9, 0.99), weight_decay: float = 0.0):
    """The published Lion update in float64 (the target of the fp32 mode): (p', m')."""
    b1, b2 = betas
    p, g, m = (np.asarray(a, dtype=np.float64) for a in (p, g, m))
    c = b1 * m + (1 - b1) * g
    return p * (1 - lr * weight_decay) - lr * np.sign(c), b2 * m + (1 - b2) * g
