"""Checkpoints of srkern's optimizers: the errors, the formats, and the checks that
``srkern.torch.AdamW`` state dicts and ``ShardedAdamWCore`` folders share.

Two formats, no pickle in either:

* ``srkern.torch.AdamW.state_dict()``: torch's state dict plus an ``"srkern"`` entry (format,
  version, bit contract, step, seed, precision, state dtype and the flat layout).
* a sharded folder (:func:`save_sharded`): one raw ``.bin`` per rank holding the sections of
  its shard back to back (``param``, then :func:`state_sections` of the mode, little-endian) and
  ``manifest.json`` (format, version, contract, world size, step, seed, precision, sections,
  groups, layout, ``extra`` and per shard its range, size and SHA-256). Every file is written
  atomically and the manifest goes last, so the folder switches from the old checkpoint to the
  new one in one rename. It loads on any world size (each rank reads the ranges it now owns).

Everything is checked before anything is loaded. :class:`CheckpointMismatch` says the
checkpoint is readable but belongs to another model, optimizer or format version;
:class:`CheckpointCorrupt` says it is missing, truncated, corrupted or malformed.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import _contract
from ._files import atomic_write
from ._tensor import as_view
from .adamw import check_hyperparameters
from .formats import NP_DTYPES
from .layout import shard_range
from .precisions import mode

SHARDED_FORMAT, SHARDED_VERSION = "srkern.ShardedAdamW", 1
TORCH_FORMAT, TORCH_VERSION = "srkern.torch.AdamW", 1
HYPER_KEYS = ("lr", "betas", "eps", "weight_decay")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupted or does not match the model; nothing was loaded."""


class CheckpointCorrupt(CheckpointError, ValueError):
    """The checkpoint cannot be trusted: a file is missing, short, fails its SHA-256 check, or a
    field is malformed or out of range."""


class CheckpointMismatch(CheckpointError, ValueError):
    """The checkpoint is intact but written for another model, optimizer, format or contract."""


# ---- what a mode stores ------------------------------------------------------------------------

def state_sections(precision: str, state_dtype: str) -> list[tuple[str, str]]:
    """(name, dtype) of the optimizer state a mode keeps per parameter, in checkpoint order."""
    p = mode(precision)
    out = [("exp_avg", state_dtype), ("exp_avg_sq", state_dtype)]
    if p.master:
        out.append(("master", "float32"))
    if p.compensation:
        out.append(("compensation", "bfloat16"))
    return out


def check_hyper(h: dict, grad_scale: Any = 1.0) -> None:
    """One parameter group's hyper-parameters (and ``grad_scale``): every key of ``HYPER_KEYS``
    present and valid for ``srkern.adamw.check_hyperparameters``; ``ValueError`` otherwise."""
    missing = [k for k in HYPER_KEYS if k not in h]
    if missing:
        raise ValueError(f"hyper-parameters {missing} missing")
    check_hyperparameters(h["lr"], h["betas"], h["eps"], h["weight_decay"], grad_scale)


# ---- the checks both formats make ---------------------------------------------------------------

def check_format(meta: dict, fmt: str, version: int, contract_key: str) -> None:
    """The format name, its version and the bit contract the state was written under."""
    if meta.get("format") != fmt or meta.get("format_version") != version:
        raise CheckpointMismatch(f"not a {fmt} v{version} checkpoint (format {meta.get('format')!r}, "
                                 f"version {meta.get('format_version')!r})")
    if not _contract.contract_compatible(meta.get(contract_key)):  # any 1.x loads under 1.1
        raise CheckpointMismatch(f"written under bit contract v{meta.get(contract_key)}, "
                                 f"this srkern uses v{_contract.CONTRACT_VERSION}")


def expect_equal(what: str, saved: Any, mine: Any) -> None:
    """A setting the checkpoint must share with the optimizer loading it."""
    if saved != mine:
        raise CheckpointMismatch(f"{what}: {saved!r} in the checkpoint, {mine!r} here")


def check_layout(saved: Sequence[Any], mine: Sequence[Any]) -> None:
    """The flat layout (one entry per parameter), reported at its first difference."""
    saved, mine = list(saved), list(mine)
    if len(saved) != len(mine):
        raise CheckpointMismatch(f"layout: {len(saved)} parameters in the checkpoint, {len(mine)} here")
    for i, (a, b) in enumerate(zip(saved, mine, strict=True)):
        if a != b:
            raise CheckpointMismatch(f"layout differs at parameter {i}: {a!r} in the checkpoint, {b!r} here")


def check_counters(meta: dict) -> None:
    """The 64-bit seed and the 32-bit step count (the Philox counter word)."""
    try:
        _contract.check_u64("seed", meta["seed"])
        _contract.check_u64("step", meta["step"], _contract.U32)
    except (TypeError, ValueError) as e:
        raise CheckpointCorrupt(str(e)) from None


def check_hypers(saved: Any, n_groups: int) -> list[dict]:
    """Per-group hyper-parameters stored in a checkpoint: one valid set per group."""
    if not isinstance(saved, list) or len(saved) != n_groups:
        n = len(saved) if isinstance(saved, list) else saved
        raise CheckpointMismatch(f"parameter groups: {n!r} in the checkpoint, {n_groups} here")
    for i, h in enumerate(saved):
        try:
            check_hyper(h)
        except (TypeError, ValueError) as e:
            raise CheckpointCorrupt(f"parameter group {i}: {e}") from None
    return saved


# ---- raw bytes of any framework's tensor -------------------------------------------------------

def host_bytes(x: Any) -> bytes:
    """The raw bytes of a contiguous tensor (copied to the host)."""
    v = as_view(x, "x")
    if v.nbytes == 0:
        return b""
    if v.device == "cuda":
        import cupy
        with cupy.cuda.Device(v.device_id):
            cupy.cuda.Device(v.device_id).synchronize()
            host = np.empty(v.nbytes, dtype=np.uint8)
            cupy.cuda.runtime.memcpy(host.ctypes.data, v.ptr, v.nbytes, cupy.cuda.runtime.memcpyDeviceToHost)
        return host.tobytes()
    return ctypes.string_at(v.ptr, v.nbytes)


def write_host_bytes(x: Any, data: bytes | memoryview) -> None:
    """Overwrite a contiguous tensor with raw bytes of exactly its size."""
    v = as_view(x, "x")
    if len(data) != v.nbytes:
        raise ValueError(f"expected {v.nbytes} bytes, got {len(data)}")
    if v.nbytes == 0:
        return
    src = np.frombuffer(data, dtype=np.uint8)
    if v.device == "cuda":
        import cupy
        with cupy.cuda.Device(v.device_id):
            cupy.cuda.Device(v.device_id).synchronize()
            cupy.cuda.runtime.memcpy(v.ptr, src.ctypes.data, v.nbytes, cupy.cuda.runtime.memcpyHostToDevice)
    else:
        ctypes.memmove(v.ptr, src.ctypes.data, v.nbytes)


# ---- sharded folders ------------------------------------------------------------------------------

def _sections_of(core: Any) -> list[dict]:
    return [{"name": nm, "dtype": as_view(t, nm).dtype} for nm, t in core.state_sections()]


def save_sharded(core: Any, path: str | os.PathLike, layout: Any = None, extra: dict | None = None) -> None:
    """Write ``core``'s (a ``ShardedAdamWCore``) sharded state to folder ``path``; collective.

    Older shard files are removed once the new manifest is in place. Any failure on any rank
    raises :class:`CheckpointError` on every rank.
    """
    comm = core.comm
    folder = Path(path)
    name = f"step-{core.step_count:010d}-rank-{comm.rank:05d}-of-{comm.size:05d}.bin"
    err = ""
    if comm.rank == 0:  # every rank takes part in the bcast, whether or not the mkdir worked
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except Exception as e:
            err = f"rank 0: {type(e).__name__}: {e}"
    err = comm.mpi.bcast(err, root=0)  # also: nobody writes before the folder exists
    if err:
        raise CheckpointError(f"saving checkpoint to {folder} failed: {err}")
    info = None
    try:
        data = b"".join(host_bytes(t) for _, t in core.state_sections())
        atomic_write(folder / name, data)
        info = {"rank": comm.rank, "start": core.start, "stop": core.stop, "file": name,
                "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    except Exception as e:  # reported on every rank below
        err = f"rank {comm.rank}: {type(e).__name__}: {e}"
    infos = comm.mpi.gather((info, err), root=0)
    if comm.rank == 0:
        errs = [e for _, e in infos if e]
        if not errs:
            try:
                manifest = {
                    "format": SHARDED_FORMAT, "format_version": SHARDED_VERSION,
                    "contract_version": _contract.CONTRACT_VERSION,
                    "world_size": comm.size, "step": core.step_count, "seed": core.seed,
                    "precision": core.precision, "n": core.n,
                    "groups": [[g.start, g.stop] for g in core.groups],
                    "sections": _sections_of(core), "layout": layout, "extra": extra or {},
                    "shards": [i for i, _ in infos],
                }
                atomic_write(folder / "manifest.json", json.dumps(manifest, indent=1).encode())
                keep = {i["file"] for i, _ in infos}
                for old in folder.glob("step-*-rank-*-of-*.bin"):
                    if old.name not in keep:
                        old.unlink()
            except Exception as e:
                errs.append(f"rank 0: {type(e).__name__}: {e}")
        err = "; ".join(errs)
    err = comm.mpi.bcast(err, root=0)
    if err:
        raise CheckpointError(f"saving checkpoint to {folder} failed: {err}")


def check_manifest(man: dict, core: Any, layout: Any) -> None:
    """Every manifest field against ``core``; :class:`CheckpointMismatch` or :class:`CheckpointCorrupt`."""
    check_format(man, SHARDED_FORMAT, SHARDED_VERSION, "contract_version")
    # JSON numbers compare equal across types (100.0 == 100), but a float start or size would
    # fail later, in the copy loop of some ranks only: every count must be a plain int.
    counts = [("n", man["n"]), ("world_size", man["world_size"])]
    counts += [(f"shards[{k}].{f}", sh.get(f) if isinstance(sh, dict) else None)
               for k, sh in enumerate(man["shards"] if isinstance(man["shards"], list) else [None])
               for f in ("start", "stop", "bytes")]
    bad = [name for name, v in counts if type(v) is not int]
    if bad:
        raise CheckpointCorrupt(f"manifest fields {bad} must be integers")
    if not isinstance(man["extra"], dict):
        raise CheckpointCorrupt(f"manifest field extra must be an object, got {type(man['extra']).__name__}")
    expect_equal("number of parameters", man["n"], core.n)
    expect_equal("precision", man["precision"], core.precision)
    expect_equal("state sections", man["sections"], _sections_of(core))
    expect_equal("parameter groups", man["groups"], [[g.start, g.stop] for g in core.groups])
    if layout is not None:
        if not isinstance(man["layout"], list):
            raise CheckpointMismatch(f"layout: {man['layout']!r} in the checkpoint, one entry per parameter here")
        check_layout(man["layout"], layout)
    if "hyper" in man["extra"]:
        check_hypers(man["extra"]["hyper"], len(core.groups))
    w = man["world_size"]
    shards = man["shards"]
    for sh in shards:
        if not (isinstance(sh.get("file"), str) and Path(sh["file"]).name == sh["file"]
                and isinstance(sh.get("bytes"), int) and isinstance(sh.get("sha256"), str)):
            raise CheckpointCorrupt(f"bad shard entry {sh!r}")
    if not isinstance(w, int) or w < 1 or len(shards) != w or \
            [(s["start"], s["stop"]) for s in shards] != [shard_range(core.n, w, r) for r in range(w)]:
        raise CheckpointCorrupt(f"shard table does not tile {core.n} elements over {w!r} ranks")
    check_counters(man)


def load_sharded(core: Any, path: str | os.PathLike, layout: Any = None) -> dict:
    """Read folder ``path`` into ``core``'s shard sections (collective); returns the manifest.

    The manifest is checked on every rank and every shard file is read and verified (size and
    SHA-256) by some rank before any rank writes a buffer; any problem raises the same
    :class:`CheckpointError` subclass on every rank and loads nothing. The caller gathers the
    weights and takes over step and seed.
    """
    comm = core.comm
    folder = Path(path)
    where = folder / "manifest.json"
    text, err = None, ""
    if comm.rank == 0:
        try:
            text = where.read_text()
        except OSError as e:
            err = f"cannot read {where}: {e}"
    text, err = comm.mpi.bcast((text, err), root=0)
    if err:
        raise CheckpointCorrupt(err)
    try:
        man = json.loads(text)
    except ValueError as e:
        raise CheckpointCorrupt(f"{where} is not valid JSON: {e}") from None
    try:
        if not isinstance(man, dict):
            raise TypeError(f"a JSON object was expected, got {type(man).__name__}")
        check_manifest(man, core, layout)
    except CheckpointError as e:
        raise type(e)(f"{where}: {e}") from None
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointCorrupt(f"{where} is malformed: {type(e).__name__}: {e}") from None
    # Read and verify: the files overlapping this rank's new shard, plus every world-th file,
    # so that each file is verified by some rank before anyone loads anything.
    sec = [(s["name"], NP_DTYPES[s["dtype"]].itemsize) for s in man["sections"]]
    per_elem = sum(sz for _, sz in sec)
    blobs: dict[int, bytes] = {}
    err = ""
    for k, sh in enumerate(man["shards"]):
        overlaps = sh["start"] < core.stop and core.start < sh["stop"]
        if not (overlaps or k % comm.size == comm.rank):
            continue
        f = folder / sh["file"]
        try:
            data = f.read_bytes()
        except OSError as e:
            err = err or f"shard {k}: cannot read {f}: {e}"
            continue
        want = (sh["stop"] - sh["start"]) * per_elem
        if len(data) != want or sh["bytes"] != want:
            err = err or f"shard {k}: {f} has {len(data)} bytes, expected {want} (truncated?)"
        elif hashlib.sha256(data).hexdigest() != sh["sha256"]:
            err = err or f"shard {k}: {f} fails its SHA-256 check (corrupted)"
        elif overlaps:
            blobs[k] = data
    errs = [e for e in comm.mpi.allgather(err) if e]
    if errs:
        raise CheckpointCorrupt(f"checkpoint {folder} refused, nothing loaded: {errs[0]}")
    # All verified everywhere: now copy the overlapping ranges into this rank's state.
    mine = dict(core.state_sections())
    for k, data in blobs.items():
        sh = man["shards"][k]
        cnt = sh["stop"] - sh["start"]
        a, b = max(sh["start"], core.start), min(sh["stop"], core.stop)
        pos = 0
        for name, sz in sec:
            lo = pos + (a - sh["start"]) * sz
            write_host_bytes(mine[name][a - core.start:b - core.start], memoryview(data)[lo:lo + (b - a) * sz])
            pos += cnt * sz
    return man
