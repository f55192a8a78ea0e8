"""``srkern.adafactor_step``: a fused multi-tensor Adafactor step (torch.optim.Adafactor's update)
in five precision modes, its BF16 row and column statistics written with SR.

Four launches of ``kernels/adafactor.cu`` (whose header states every operation and its order)
with host arithmetic between them: the FP64 row and column sums of squares, the statistics, the
FP64 sums of the squared updates, the weights. Every sum has a fixed order of element indices and
the host adds FP64 partial sums left to right, so the bits are the same on every backend, thread
count and launch shape. On a GPU every host step between launches synchronises the launch stream:
about ten times per step, plus once per factored tensor (its stored row statistics are read back
for their mean). Speed on a GPU is not measured yet.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from . import _backend, _build, _contract, _table
from ._tensor import View, check_disjoint, host_bytes, mark_written, stream_of, unwritable
from .adamw import _f32, checked_buffers
from .formats import KERNEL_SUFFIX, NP_DTYPES
from .layout import flat_offsets
from .sgd import check_precision, check_seed_step

AF_CHUNK, AF_AUX_COLS = _build.kernel_defines("adafactor.cu", "AF_CHUNK", "AF_AUX_COLS")
_EPS1 = {"bfloat16": float(2.0 ** -7), "float32": float(2.0 ** -23)}  # torch.finfo(dtype).eps


def check_hyperparameters(lr: Any, beta2_decay: Any, eps: Any, d: Any, weight_decay: Any
                          ) -> tuple[float, float, float | None, float, float, float]:
    """torch.optim.Adafactor's checks (the same conditions, clear errors): returns lr,
    beta2_decay, eps1 (None: the weight dtype's machine epsilon), eps2, d, weight_decay."""
    def number(name: str, x: Any) -> float:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x):
            raise TypeError(f"{name} must be a real number, got {x!r}")
        return float(x)
    lr, beta2_decay, d, weight_decay = (number(n, x) for n, x in (("lr", lr), ("beta2_decay", beta2_decay),
                                                                   ("d", d), ("weight_decay", weight_decay)))
    if not (isinstance(eps, (tuple, list)) and len(eps) == 2):
        raise TypeError(f"eps must be a pair (eps1 or None, eps2), got {eps!r}")
    eps1 = None if eps[0] is None else number("eps[0]", eps[0])
    eps2 = number("eps[1]", eps[1])
    if not 0.0 <= lr < math.inf:
        raise ValueError(f"Learning rate should be >= 0 and finite but is: {lr}")
    if not beta2_decay <= 0.0:
        raise ValueError(f"beta2_decay should be <= 0 but is: {beta2_decay}")
    if eps1 is not None and not 0.0 <= eps1 < math.inf:
        raise ValueError(f"epsilon1 should be >= 0 and finite but is: {eps1}")
    if not 0.0 <= eps2 < math.inf:
        raise ValueError(f"epsilon2 should be >= 0 and finite but is: {eps2}")
    if not 1.0 <= d < math.inf:
        raise ValueError(f"Clipping threshold d should be >= 1 and finite but is: {d}")
    if not 0.0 <= weight_decay < math.inf:
        raise ValueError(f"weight_decay should be >= 0 and finite but is: {weight_decay}")
    return lr, beta2_decay, eps1, eps2, d, weight_decay


def _factors(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(B, R, C) of a factored shape (..., R, C) (two or more dimensions, as torch factors
    ``dim() > 1``, empty ones included); (1, 0, 0) for 0 or 1 dimensions, which the kernels'
    auxiliary table marks with R = 0 (a factored tensor with elements has R > 0)."""
    if len(shape) < 2:
        return 1, 0, 0
    return math.prod(shape[:-2]), shape[-2], shape[-1]


def adafactor_step(params: Sequence[Any], grads: Sequence[Any], row_vars: Sequence[Any | None],
                   col_vars: Sequence[Any | None], variances: Sequence[Any | None], *, step: int,
                   lr: float = 1e-2, beta2_decay: float = -0.8, eps: tuple[float | None, float] = (None, 1e-3),
                   d: float = 1.0, weight_decay: float = 0.0, maximize: bool = False,
                   precision: str = "bf16-sr", master_params: Sequence[Any] | None = None,
                   compensation: Sequence[Any] | None = None, grad_scale: float = 1.0, seed: int,
                   offsets: Sequence[int] | None = None) -> None:
    """One Adafactor step, as ``torch.optim.Adafactor`` defines it, on lists of tensors, in place.

    Tensors as for :func:`srkern.adamw_step` (``__dlpack__`` tensors or NumPy arrays, contiguous,
    one device; torch tensors' versions bumped).

    Args:
        params: weights, BF16 (FP32 for ``precision="fp32"``; in ``fp32-master`` the BF16 model
            copy, written to nearest from the master, never read).
        grads: BF16 or FP32 (one dtype per call), each the shape of its parameter.
        row_vars, col_vars: for a parameter of two or more dimensions (..., R, C), torch's
            ``row_var`` of shape (..., R, 1) and ``col_var`` of shape (..., 1, C); None for the
            others. variances: for a parameter of 0 or 1 dimensions, torch's ``variance`` (its
            shape); None for the others. All statistics of one dtype: BF16 or FP32 in the BF16
            modes (BF16 written with SR in ``bf16-sr`` and ``bf16-kahan``), FP32 in
            ``fp32-master`` and ``fp32``. Start at 0.
        step: the step, from 1 (torch's step after its increment; also contract v1's ``step``).
        lr, beta2_decay, eps, d, weight_decay, maximize: torch.optim.Adafactor's meanings and
            checks; ``eps[0]`` None is the machine epsilon of the weights updated (BF16: 2**-7;
            FP32, and the FP32 master of ``fp32-master``: 2**-23), as torch takes
            ``finfo(param.dtype).eps``.
        precision: ``bf16-sr``, ``bf16-nearest``, ``bf16-kahan``, ``fp32-master`` or ``fp32``.
        master_params, compensation: as for :func:`srkern.adamw_step`.
        grad_scale: every gradient is multiplied by it (FP32) where it is read.
        seed: 64-bit Philox key. offsets: logical flat index of each tensor's first element
            (default: cumulative sizes).

    The update (``kernels/adafactor.cu``): alpha = max(eps2, RMS(x)) * min(lr, 1/sqrt(step)) from
    the weights before the step; statistics lerp'd towards the row and column means of g**2 (g**2
    for vectors) with weight step**beta2_decay; u = rsqrt(max(vhat, eps1**2)) * g with vhat =
    row * col / mean(row) (the statistics for vectors); p = p * (1 - lr * weight_decay) -
    (alpha / max(1, RMS(u) / d)) * u. Sums of squares in FP64 in a fixed order.

    Random bits (contract v1): the weight as every srkern optimizer (PARAM or COMPENSATION, index
    offset + j); a BF16 row statistic (b, r) the 16-bit draw of stream ``row_var`` at index offset
    + b*R + r, a column statistic (b, c) stream ``col_var`` at offset + b*C + c, a vector's
    statistic stream ``exp_avg_sq`` at offset + j. Every argument is checked before anything is
    written.
    """
    launch = prepare_adafactor(params, grads, row_vars, col_vars, variances, step=step, lr=lr,
                               beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay,
                               maximize=maximize, precision=precision, master_params=master_params,
                               compensation=compensation, grad_scale=grad_scale, seed=seed, offsets=offsets)
    if launch is not None:
        launch()


def prepare_adafactor(params: Sequence[Any], grads: Sequence[Any], row_vars: Sequence[Any | None],
                      col_vars: Sequence[Any | None], variances: Sequence[Any | None], *, step: int,
                      lr: float = 1e-2, beta2_decay: float = -0.8, eps: tuple[float | None, float] = (None, 1e-3),
                      d: float = 1.0, weight_decay: float = 0.0, maximize: bool = False,
                      precision: str = "bf16-sr", master_params: Sequence[Any] | None = None,
                      compensation: Sequence[Any] | None = None, grad_scale: float = 1.0, seed: int,
                      offsets: Sequence[int] | None = None) -> Callable[[], None] | None:
    """:func:`adafactor_step`'s checks and scratch buffers: the step that writes, ready to call
    (None when there are no tensors), so that ``srkern.torch.Adafactor`` checks every bucket first."""
    prec = check_precision(precision, "adafactor_step")
    seed, step = check_seed_step(seed, step)
    lr, beta2_decay, eps1, eps2, d, weight_decay = check_hyperparameters(lr, beta2_decay, eps, d, weight_decay)
    if not isinstance(maximize, bool):
        raise TypeError(f"maximize must be a bool, got {maximize!r}")
    grad_scale = _contract.check_f32("grad_scale", grad_scale, -math.inf)  # finite in FP32

    pv, gv, _, wv, kv, _ = checked_buffers(prec, params, grads, (), master_params, compensation, None,
                                           "adafactor_step", "an Adafactor step")
    n = len(pv)  # (checked_buffers returns no views only for no tensors)
    rv = _table.views("row_vars", row_vars, n, allow_none=True)
    cv = _table.views("col_vars", col_vars, n, allow_none=True)
    vv = _table.views("variances", variances, n, allow_none=True)
    if n == 0:
        return None
    stats: list[tuple[str, View]] = []
    for i, p in enumerate(pv):
        factored = len(p.shape) >= 2
        want = ({"row_vars": (*p.shape[:-1], 1), "col_vars": (*p.shape[:-2], 1, p.shape[-1])} if factored
                else {"variances": p.shape})
        for name, lst in (("row_vars", rv), ("col_vars", cv), ("variances", vv)):
            x = lst[i]
            if name not in want:
                if x is not None:
                    raise ValueError(f"{name}[{i}] must be None: params[{i}] has shape {p.shape} "
                                     f"({'factored' if factored else 'not factored'})")
                continue
            if x is None:
                raise ValueError(f"{name}[{i}] is None, but params[{i}] of shape {p.shape} needs one "
                                 f"of shape {want[name]}")
            if x.shape != tuple(want[name]):
                raise ValueError(f"{name}[{i}] has shape {x.shape}, params[{i}] of shape {p.shape} "
                                 f"needs {tuple(want[name])}")
            stats.append((f"{name}[{i}]", x))
    for name, x in stats:
        if x.dtype not in prec.state_dtypes:
            raise TypeError(f"{name} has dtype {x.dtype}; {prec.name} needs {' or '.join(prec.state_dtypes)}")
        if (x.device, x.device_id) != (pv[0].device, pv[0].device_id):
            raise ValueError(f"{name} is on {x.device}:{x.device_id}, params[0] on {pv[0].device}:{pv[0].device_id}")
        if not x.contiguous:
            raise ValueError(f"{name} must be contiguous and aligned (it is written in place)"
                             + (f": it {x.needs_copy}" if x.needs_copy else ""))
        if x.framework == "jax":
            raise TypeError(f"{name}: JAX arrays are immutable; adafactor_step works in place")
        if why := unwritable(x):
            raise ValueError(f"{name} {why}")
    if len({x.dtype for _, x in stats}) > 1:
        raise TypeError(f"the statistics mix dtypes {sorted({x.dtype for _, x in stats})}: one dtype per call")
    # (checked_buffers has checked the others among themselves: each statistic against all of them)
    named = [(f"{name}[{i}]", v) for name, vs in (("params", pv), ("grads", gv), ("master_params", wv),
                                                   ("compensation", kv)) for i, v in enumerate(vs)]
    check_disjoint(named + stats, "every buffer of an Adafactor step must be distinct")
    offs = flat_offsets([p.numel for p in pv], offsets)
    sdtype = stats[0][1].dtype if stats else prec.state_dtypes[0]
    xdtype = "float32" if prec.master else prec.param_dtype
    e1 = _EPS1[xdtype] if eps1 is None else eps1

    launch = _Launch(prec, pv, gv, rv, cv, vv, wv, kv, offs, sdtype, seed).alloc()
    written = pv + wv + kv + [x for _, x in stats]

    def run() -> None:
        launch.run(step=step, lr=lr, beta2_decay=beta2_decay, eps1=e1, eps2=eps2, d=d, weight_decay=weight_decay,
                   grad_scale=_f32(-grad_scale if maximize else grad_scale))
        mark_written(written)
    return run


class _Launch:
    """The four launches of one checked step, and the host arithmetic between them."""

    def __init__(self, prec, pv, gv, rv, cv, vv, wv, kv, offs, sdtype, seed) -> None:
        self.pv, self.seed, self.dev = pv, seed, pv[0]
        g = KERNEL_SUFFIX[gv[0].dtype]
        s = KERNEL_SUFFIX[sdtype]
        self.names = {"rows": f"af_rows_{prec.kernel}_g{g}", "cols": f"af_cols_g{g}",
                      "stats": f"af_stats_{prec.kernel}_g{g}_s{s}", "usq": f"af_usq_{prec.kernel}_g{g}_s{s}",
                      "apply": f"af_apply_{prec.kernel}_g{g}_s{s}"}
        self.sdtype = sdtype
        n = len(pv)
        zero = [0] * n
        self.cols = [[p.ptr for p in pv], [x.ptr for x in gv],
                     [(r or v).ptr for r, v in zip(rv, vv)], [c.ptr if c else 0 for c in cv],
                     [w.ptr for w in wv] if wv else zero, [k.ptr for k in kv] if kv else zero]
        self.offs = offs
        self.brc = [_factors(p.shape) for p in pv]
        self.rv = rv
        self.rows = [(-(-p.numel // AF_CHUNK) if R == 0 else B * R) if p.numel else 0
                     for p, (B, R, C) in zip(pv, self.brc)]
        self.ncols = [B * C if R and p.numel else 0 for p, (B, R, C) in zip(pv, self.brc)]
        self.nstats = [(B * R + B * C if R else p.numel) if p.numel else 0 for p, (B, R, C) in zip(pv, self.brc)]
        self.pairs = [0 if p.numel == 0 else (o + p.numel - 1) // 8 - o // 8 + 1 for p, o in zip(pv, offs)]

    # ---- device plumbing: every device buffer made, filled and read on the launch stream -------

    def _stream(self):
        import cupy
        return cupy.cuda.Device(self.dev.device_id), _backend.cupy_stream(stream_of(self.dev), self.dev.device_id)

    def _array(self, n: int, dtype: Any):
        if self.dev.device == "cpu":
            return np.zeros(max(n, 1), dtype=dtype)
        import cupy
        dev, cs = self._stream()
        with dev, cs:
            return cupy.zeros(max(n, 1), dtype=dtype)

    def _set(self, dst, src: np.ndarray) -> None:
        """Host values ``src`` into the buffer ``dst`` made by :meth:`_array`, in stream order."""
        if isinstance(dst, np.ndarray):
            dst[:src.size] = src
            return
        dev, cs = self._stream()
        with dev, cs:
            dst[:src.size].set(src, stream=cs)
            cs.synchronize()  # (src may be freed when this returns)

    def _host(self, a) -> np.ndarray:
        if isinstance(a, np.ndarray):
            return a
        import cupy
        dev, cs = self._stream()
        with dev, cs:
            out = cupy.asnumpy(a, stream=cs)
            cs.synchronize()
        return out

    @staticmethod
    def _ptr(a) -> int:
        return a.ctypes.data if isinstance(a, np.ndarray) else a.data.ptr

    def _launch(self, kind: str, units: list[int], h: tuple, *ptrs: int) -> None:
        table, total = _table.table(self.pv, self.cols, self.offs, units)
        if total == 0:
            return
        dt, tptr = _table.device_table(table, self.dev, stream_of(self.dev))
        self._set(self.daux, self.aux.reshape(-1))
        args = [("p", tptr), ("p", self._ptr(self.daux)), ("q", len(self.pv)), ("q", total), ("Q", self.seed),
                ("Q", h[0]), *(("f", x) for x in h[1:]), *(("p", p) for p in ptrs)]
        _backend.launch("adafactor", self.names[kind], args, device=self.dev.device,
                        device_id=self.dev.device_id, units=total, stream=stream_of(self.dev), exact=False)
        del dt

    # ---- the step --------------------------------------------------------------------------------

    def alloc(self) -> "_Launch":
        """Every scratch buffer, made before the first launch (of any bucket: ``srkern.torch.Adafactor``
        prepares all its steps first), so that a failed allocation writes nothing."""
        n = len(self.pv)
        self.factored = [bool(R) and p.numel > 0 for p, (B, R, C) in zip(self.pv, self.brc)]
        ntarget = sum(B * (R + C) for f, (B, R, C) in zip(self.factored, self.brc) if f)
        nmean = sum(B for f, (B, R, C) in zip(self.factored, self.brc) if f)
        nrow = sum(self.rows)
        self.aux = np.zeros((n, AF_AUX_COLS), dtype=np.uint64)
        self.daux = self._array(self.aux.size, np.uint64)
        self.scratch = [self._array(nrow, np.float64) for _ in range(3)] + [
            self._array(sum(self.ncols), np.float64), self._array(ntarget, np.float32), self._array(nmean, np.float32)]
        return self

    def run(self, *, step: int, lr: float, beta2_decay: float, eps1: float, eps2: float, d: float,
            weight_decay: float, grad_scale: float) -> None:
        """The step (after :meth:`alloc`); from here on buffers are written."""
        factored = self.factored
        xsq, gsq, usq, csq, target, mean = self.scratch
        tptr, mptr = self._ptr(target), self._ptr(mean)
        for t, (B, R, C) in enumerate(self.brc):
            self.aux[t, 0], self.aux[t, 1] = (R, C) if factored[t] else (0, 0)
        w = _f32(float(step) ** beta2_decay)
        decay, lrwd = _f32(1.0 - lr * weight_decay), _f32(lr * weight_decay)
        h = (step, grad_scale, w, decay, lrwd)
        # launch 1: FP64 row sums of x^2 and g^2; 1b: column sums of g^2
        self._launch("rows", self.rows, h, self._ptr(xsq), self._ptr(gsq))
        self._launch("cols", self.ncols, h, self._ptr(csq))
        hx, hg, hc = self._host(xsq), self._host(gsq), self._host(csq)
        rho = min(lr, 1.0 / (float(step) ** 0.5))
        alphas, targets = [], []
        r0 = c0 = to = 0
        for t, (p, (B, R, C), nr, nc) in enumerate(zip(self.pv, self.brc, self.rows, self.ncols)):
            sx = float(np.cumsum(hx[r0:r0 + nr])[-1]) if nr else 0.0
            alphas.append(max(eps2, math.sqrt(sx) / (p.numel ** 0.5) if p.numel else 0.0) * rho)
            if factored[t]:  # launch 2's targets: the row means, then the column means
                targets += [(hg[r0:r0 + nr] / C).astype(np.float32), (hc[c0:c0 + nc] / R).astype(np.float32)]
                self.aux[t, 2] = tptr + 4 * to
                to += B * (R + C)
            r0, c0 = r0 + nr, c0 + nc
        if targets:
            self._set(target, np.concatenate(targets))
        # launch 2: the statistics
        self._launch("stats", self.nstats, h)
        # host: the mean of each batch's stored row statistics, at least eps1
        e1 = np.float32(_f32(eps1))
        means, mo = [], 0
        for t, (r, (B, R, C)) in enumerate(zip(self.rv, self.brc)):
            if factored[t]:
                stored = np.frombuffer(host_bytes(r.obj), dtype=NP_DTYPES[self.sdtype]).astype(np.float64)
                m = (np.cumsum(stored.reshape(B, R), axis=1)[:, -1] / R).astype(np.float32)
                means.append(np.where(m < e1, e1, m))  # torch's clamp_(min=eps1): NaN stays NaN
                self.aux[t, 2] = mptr + 4 * mo
                mo += B
        if means:
            self._set(mean, np.concatenate(means))
        e1sq = int(np.float32(_f32(eps1 * eps1)).view(np.uint32)) << 32
        self.aux[:, 3] = e1sq
        # launch 3: FP64 row sums of u0^2
        self._launch("usq", self.rows, h, self._ptr(usq))
        hu = self._host(usq)
        r0 = 0
        for t, (p, nr) in enumerate(zip(self.pv, self.rows)):
            su = float(np.cumsum(hu[r0:r0 + nr])[-1]) if nr else 0.0
            denom = max(1.0, math.sqrt(su) / ((p.numel ** 0.5) * d) if p.numel else 0.0)
            self.aux[t, 3] = e1sq | int(np.float32(_f32(alphas[t] / denom)).view(np.uint32))
            r0 += nr
        # launch 4: the weights
        self._launch("apply", self.pairs, h)
        del target, mean, xsq, gsq, csq, usq
        self.scratch = []
