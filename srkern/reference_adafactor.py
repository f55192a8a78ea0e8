"""The NumPy oracle of ``srkern.adafactor_step`` (kernels/adafactor.cu's contract), written out
on its own: the FP64 sums of squares row by row in element order (``np.cumsum`` is a sequential
scan), added left to right; the statistics lerp'd in FP32 and rounded by the contract's rule; the
weight side through :mod:`srkern.reference`'s ``_elementwise_step``, which every optimizer shares.
"""
from __future__ import annotations

import math

import numpy as np

from ._contract import STREAMS
from .formats import dtype_name
from .layout import flat_offsets
from .reference import _elementwise_step, canonical_nan, round_float32

AF_CHUNK = 2048  # elements per row of a tensor of 0 or 1 dimensions (the kernels' AF_CHUNK)
_EPS1 = {"bfloat16": 2.0 ** -7, "float32": 2.0 ** -23}


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """Sums along the last axis in index order, in FP64 (0 for an empty axis)."""
    if a.shape[-1] == 0:
        return np.zeros(a.shape[:-1])
    return np.cumsum(a.astype(np.float64), axis=-1)[..., -1]


def _rows(v: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The row sums of the squares of the flat FP32 values ``v`` in the kernels' row order: rows
    of C for a factored shape, of AF_CHUNK (the last one shorter) otherwise; element k of a row
    in lane k % 8, each lane summed in order, then ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)).
    Rows are padded with +0, which changes no sum of squares."""
    sq = v.astype(np.float64) ** 2
    length = shape[-1] if len(shape) >= 2 else AF_CHUNK
    sq = np.concatenate([sq, np.zeros((-len(sq)) % length)]).reshape(-1, length)
    sq = np.concatenate([sq, np.zeros((len(sq), (-length) % 8))], axis=1).reshape(len(sq), -1, 8)
    lanes = _seq_sum(np.moveaxis(sq, 1, 2))  # (rows, 8)
    a = [lanes[:, e] for e in range(8)]
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))


def _total(rows: np.ndarray) -> float:
    return float(np.cumsum(rows)[-1]) if rows.size else 0.0


def adafactor_step(params, grads, row_vars, col_vars, variances, *, step: int, lr: float = 1e-2,
                   beta2_decay: float = -0.8, eps=(None, 1e-3), d: float = 1.0, weight_decay: float = 0.0,
                   maximize: bool = False, precision: str = "bf16-sr", master_params=None,
                   compensation=None, grad_scale: float = 1.0, seed: int = 0, offsets=None) -> dict[str, list]:
    """One Adafactor step; returns ``params``, ``row_vars``, ``col_vars``, ``variances``,
    ``master_params``, ``compensation`` (new arrays; None entries where the input had None)."""
    f32 = np.float32
    if offsets is None:
        offsets = flat_offsets([np.asarray(p).size for p in params])
    sr = precision in ("bf16-sr", "bf16-kahan")
    gs = f32(-grad_scale if maximize else grad_scale)
    w = f32(float(step) ** beta2_decay)
    rho = min(lr, 1.0 / (float(step) ** 0.5))
    xdtype = "float32" if precision in ("fp32-master", "fp32") else "bfloat16"
    eps1 = _EPS1[xdtype] if eps[0] is None else eps[0]
    e1, e1sq = f32(eps1), f32(eps1 * eps1)

    def lerp(s, t):
        return (s + w * (t - s)) if w < 0.5 else (t - (t - s) * (f32(1) - w))

    def store(x, like, off, stream):
        if like is None:
            return None
        if dtype_name(np.asarray(like).dtype) == "bfloat16":
            return canonical_nan(round_float32(x, "bfloat16", "stochastic" if sr else "nearest", seed=seed,
                                               offset=off, step=step, stream=stream)).reshape(np.shape(like))
        return canonical_nan(x.astype(f32)).reshape(np.shape(like))

    out = {"row_vars": [], "col_vars": [], "variances": []}
    updates = []
    with np.errstate(all="ignore"):
        for t, (p, g) in enumerate(zip(params, grads, strict=True)):
            shape, off, n = np.shape(p), int(offsets[t]), int(np.asarray(p).size)
            x = np.asarray(master_params[t] if precision == "fp32-master" else p).astype(f32).reshape(-1)
            g32 = np.asarray(g).astype(f32).reshape(-1) * gs
            if n == 0:  # nothing to update: the statistics stay as they are
                for k, src in (("row_vars", row_vars), ("col_vars", col_vars), ("variances", variances)):
                    out[k].append(None if src[t] is None else np.array(src[t], copy=True))
                updates.append(np.zeros(0, f32))
                continue
            alpha = max(eps[1], math.sqrt(_total(_rows(x, shape))) / (n ** 0.5)) * rho
            if len(shape) >= 2:
                C, R = shape[-1], shape[-2]
                B = n // (R * C)
                g3 = g32.reshape(B, R, C)
                row_t = (_rows(g32, shape) / C).astype(f32)
                col_t = (_seq_sum(np.moveaxis(g3.astype(np.float64) ** 2, 1, 2)) / R).astype(f32).reshape(-1)
                rv = store(lerp(np.asarray(row_vars[t]).astype(f32).reshape(-1), row_t), row_vars[t], off,
                           STREAMS["row_var"])
                cv = store(lerp(np.asarray(col_vars[t]).astype(f32).reshape(-1), col_t), col_vars[t], off,
                           STREAMS["col_var"])
                out["row_vars"].append(rv)
                out["col_vars"].append(cv)
                out["variances"].append(None)
                rs = np.asarray(rv).astype(f32).reshape(B, R)
                mean = (_seq_sum(rs) / R).astype(f32)
                mean = np.where(mean < e1, e1, mean)
                vhat = (rs[:, :, None] * np.asarray(cv).astype(f32).reshape(B, 1, C)) / mean[:, None, None]
                vhat = vhat.reshape(-1)
            else:
                vv = store(lerp(np.asarray(variances[t]).astype(f32).reshape(-1), g32 * g32), variances[t], off,
                           STREAMS["exp_avg_sq"])
                out["row_vars"].append(None)
                out["col_vars"].append(None)
                out["variances"].append(vv)
                vhat = np.asarray(vv).astype(f32).reshape(-1)
            u0 = (f32(1) / np.sqrt(np.where(vhat < e1sq, e1sq, vhat).astype(f32))) * g32
            denom = max(1.0, math.sqrt(_total(_rows(u0, shape))) / ((n ** 0.5) * d))
            updates.append((f32(alpha / denom) * u0).astype(f32))
    side = _elementwise_step(lambda u, x, s: (u, None), params, updates, None, precision=precision,
                             decay=1.0 - lr * weight_decay, lrwd=lr * weight_decay, master_params=master_params,
                             compensation=compensation, seed=seed, step=step, offsets=offsets)
    out.update(params=side["params"], master_params=side["master_params"], compensation=side["compensation"])
    return out
