"""Checkpoints of srkern's optimizers: the errors, the formats, and the checks that
``srkern.torch.AdamW`` state dicts and ``ShardedAdamWCore`` folders share. Two formats, no pickle:

* ``srkern.torch.AdamW.state_dict()``: torch's state dict plus an ``"srkern"`` entry (format,
  version, bit contract, step, seed, precision, state dtype and the flat layout).
* a sharded folder (:func:`save_sharded`, version 2): one raw ``.bin`` per rank holding the
  sections of its shard back to back (``param``, then :func:`state_sections` of the mode,
  little-endian) and ``manifest.json`` (format, version, contract, world size, step, seed,
  precision, sections, groups, layout, ``extra``, per shard its range, file, size and SHA-256,
  ``optimizer`` for SGD and Lion (absent: AdamW, as in every folder before them),
  and ``manifest_sha256`` over the canonical JSON of all that). Each save is a new generation
  (a random token in its file names, so it never replaces the files of the checkpoint there);
  the folder switches in one rename of the manifest once every rank's shard is written and
  fsynced, and only then are older generations removed: a crash leaves the old checkpoint or
  the new one. It loads on any world size. Every rank must see the same folder (a shared file
  system); a save checks that before it writes anything. Version 1 folders are refused.

Everything is checked before anything is loaded (the manifest field by field, every shard's type,
size and SHA-256). :class:`CheckpointMismatch` says the checkpoint is readable but belongs to
another model, optimizer or format version; :class:`CheckpointCorrupt` says it is missing,
truncated, corrupted, edited or malformed. The checksums catch damage and hand edits, not
forgery: whoever can write the folder can also write a consistent manifest.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
import re
import secrets
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import _contract
from ._files import atomic_write, open_regular, read_regular, replace_file, sync_folder
from ._tensor import as_view, host_bytes, write_host_bytes
from .adamw import check_hyperparameters
from .formats import NP_DTYPES
from .layout import shard_range
from .lion import lion_step
from .precisions import PRECISIONS, mode
from .sgd import sgd_step

SHARDED_FORMAT, SHARDED_VERSION = "srkern.ShardedAdamW", 2
TORCH_FORMAT, TORCH_VERSION = "srkern.torch.AdamW", 2  # 2: torch's layout (per-parameter steps)
HYPER_KEYS = ("lr", "betas", "eps", "weight_decay")  # AdamW's
# Each sharded optimizer's hyper-parameters (the manifest's "optimizer"; absent: "adamw").
OPTIMIZER_HYPER_KEYS = {"adamw": HYPER_KEYS,
                        "sgd": ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize"),
                        "lion": ("lr", "betas", "weight_decay", "maximize")}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupted or does not match the model; nothing was loaded."""


class CheckpointCorrupt(CheckpointError, ValueError):
    """The checkpoint cannot be trusted: a file is missing, short, fails its SHA-256 check, or a
    field is malformed or out of range."""


class CheckpointMismatch(CheckpointError, ValueError):
    """The checkpoint is intact but written for another model, optimizer, format or contract."""


# ---- what a mode stores ------------------------------------------------------------------------

def state_sections(precision: str, state_dtype: str,
                   states: Sequence[str] = ("exp_avg", "exp_avg_sq")) -> list[tuple[str, str]]:
    """(name, dtype) of the optimizer state a mode keeps per parameter, in checkpoint order: the
    optimizer's ``states`` (AdamW's moments by default) in ``state_dtype``, then the mode's own."""
    p = mode(precision)
    out = [(name, state_dtype) for name in states]
    if p.master:
        out.append(("master", "float32"))
    if p.compensation:
        out.append(("compensation", "bfloat16"))
    return out


def check_hyper(h: dict, grad_scale: Any = 1.0, optimizer: str = "adamw") -> None:
    """One parameter group's hyper-parameters (and ``grad_scale``) for ``optimizer``: every key of
    ``OPTIMIZER_HYPER_KEYS[optimizer]`` present and valid; ``ValueError`` (``TypeError``) otherwise.

    AdamW: ``srkern.adamw.check_hyperparameters``. SGD and Lion: their functional step's own checks
    (so exactly what the step accepts passes), run on zero-element FP32 buffers: nothing is
    written or launched."""
    missing = [k for k in OPTIMIZER_HYPER_KEYS[optimizer] if k not in h]
    if missing:
        raise ValueError(f"hyper-parameters {missing} missing")
    if optimizer == "adamw":
        check_hyperparameters(h["lr"], h["betas"], h["eps"], h["weight_decay"], grad_scale)
        return
    z = [[np.zeros(0, np.float32)] for _ in range(3)]
    kw = dict({k: h[k] for k in OPTIMIZER_HYPER_KEYS[optimizer]}, grad_scale=grad_scale, precision="fp32",
              seed=0, step=1)
    if optimizer == "sgd":  # buffers only with momentum > 0, as the step wants them
        moving = isinstance(h["momentum"], numbers.Real) and h["momentum"] > 0
        sgd_step(z[0], z[1], z[2] if moving else None, **kw)
    else:
        lion_step(z[0], z[1], z[2], **kw)


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
        except (TypeError, ValueError, OverflowError) as e:  # float(10**400) overflows
            raise CheckpointCorrupt(f"parameter group {i}: {e}") from None
    return saved


# ---- sharded folders: the manifest ---------------------------------------------------------------

CHECKSUM_FIELD = "manifest_sha256"
MANIFEST_FIELDS = ("format", "format_version", "contract_version", "world_size", "step", "seed", "precision",
                   "n", "groups", "sections", "layout", "extra", "shards", CHECKSUM_FIELD)
OPTIONAL_FIELDS = ("optimizer",)  # absent: "adamw" (what every folder before SGD and Lion holds)
SHARD_FIELDS = ["bytes", "file", "rank", "sha256", "start", "stop"]  # sorted: compared with sorted(entry)
MANIFEST_LIMIT = 256 << 20  # bytes; a real manifest holds about 50 bytes per parameter tensor
_TOKEN = ".srkern-save-"  # rank 0's token file, read back by every rank before a save writes anything
# What a save removes once its manifest is in place: shard files of any generation (version 1
# names included), and the temporary and token files that crashed saves left behind.
_OURS = re.compile(rf"step-\d+-(gen-[0-9a-f]+-)?rank-\d+-of-\d+\.bin(\..+\.tmp)?|manifest\.json\..+\.tmp|"
                   rf"{re.escape(_TOKEN)}[0-9a-f]+")


def _short(v: Any) -> str:  # a value for a message
    return r if len(r := repr(v)) <= 60 else r[:57] + "..."


def manifest_digest(body: dict) -> str:
    """SHA-256 (hex) of the canonical JSON of a manifest's fields (sorted keys, no spaces, ASCII)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()).hexdigest()


def seal_manifest(man: dict) -> bytes:
    """The bytes of ``manifest.json`` for the fields ``man``, with their ``manifest_sha256``. The
    fields go through JSON first (tuples become lists), so the checksum covers what a reader parses."""
    body = json.loads(json.dumps({k: v for k, v in man.items() if k != CHECKSUM_FIELD}, allow_nan=False))
    return json.dumps(dict(body, **{CHECKSUM_FIELD: manifest_digest(body)}), indent=1).encode()


def _no_duplicates(items: list) -> dict:
    if len({k for k, _ in items}) != len(items):
        raise ValueError(f"duplicate keys in {_short(dict(items))}")
    return dict(items)


def _finite(s: str) -> float:
    if not math.isfinite(float(s)):  # NaN, Infinity, or 1e999 (it would parse as Infinity): never written
        raise ValueError(f"number {s[:20]} is not a finite float")
    return float(s)


def parse_manifest(raw: bytes, where: str = "manifest.json") -> dict:
    """A sharded checkpoint's manifest from the bytes of its ``manifest.json``, every field checked.

    Pure (no file, no optimizer; :func:`check_manifest` compares it with one): UTF-8, strict JSON
    (no duplicate keys, NaN or Infinity), an object; format and version, then ``manifest_sha256``,
    then every field present, none unknown, each of its type and range; ``extra.hyper``, where
    present, exactly ``HYPER_KEYS`` per group, valid for the optimizers' own check. Raises
    :class:`CheckpointMismatch` (format, version, contract) or :class:`CheckpointCorrupt`, the
    message starting with ``where`` and naming the field.
    """
    try:
        man = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_float=_finite,
                         parse_constant=_finite)
        _check_fields(man)
    except UnicodeDecodeError as e:
        raise CheckpointCorrupt(f"{where} is not valid UTF-8: {e}") from None
    except RecursionError:  # in the parser, or in the checksum's encoder
        raise CheckpointCorrupt(f"{where} is not valid JSON: nested too deeply") from None
    except CheckpointError as e:
        raise type(e)(f"{where}: {e}") from None
    except ValueError as e:
        raise CheckpointCorrupt(f"{where} is not valid JSON: {e}") from None
    return man


def _check_fields(man: Any) -> None:
    if not isinstance(man, dict):
        raise CheckpointCorrupt(f"a JSON object was expected, got {type(man).__name__}")
    fmt, ver = man.get("format"), man.get("format_version")
    if fmt != SHARDED_FORMAT or type(ver) is not int or ver != SHARDED_VERSION:
        old = fmt == SHARDED_FORMAT and type(ver) is int and ver == 1
        raise CheckpointMismatch(f"not a {SHARDED_FORMAT} v{SHARDED_VERSION} checkpoint (format {fmt!r}, version "
                                 f"{ver!r})" + (": v1 folders have no manifest checksum; this srkern does not load "
                                                "them" if old else ""))
    if man.get(CHECKSUM_FIELD) != manifest_digest({k: v for k, v in man.items() if k != CHECKSUM_FIELD}):
        raise CheckpointCorrupt(f"the manifest does not match its checksum {CHECKSUM_FIELD} "
                                f"({'missing' if CHECKSUM_FIELD not in man else 'edited or damaged'})")
    missing = [k for k in MANIFEST_FIELDS if k not in man]
    unknown = sorted(set(man) - set(MANIFEST_FIELDS) - set(OPTIONAL_FIELDS))
    if missing or unknown:
        raise CheckpointCorrupt(f"manifest fields {missing} missing" if missing else f"unknown manifest fields {unknown}")
    if not _contract.contract_compatible(man["contract_version"]):  # any 1.x loads under 1.1
        raise CheckpointMismatch(f"written under bit contract v{man['contract_version']}, "
                                 f"this srkern uses v{_contract.CONTRACT_VERSION}")
    shards = man["shards"]
    if not isinstance(shards, list):
        raise CheckpointCorrupt(f"manifest field shards must be a list, got {type(shards).__name__}")
    for k, sh in enumerate(shards):
        if not isinstance(sh, dict) or sorted(sh) != SHARD_FIELDS:
            raise CheckpointCorrupt(f"bad shard entry shards[{k}]: {_short(sh)} is not an object with the fields "
                                    f"{SHARD_FIELDS}")
    # JSON numbers compare equal across types (100.0 == 100), but a float start or size would
    # fail later, in the copy loop of some ranks only: every count must be a plain int.
    counts = [("n", man["n"]), ("world_size", man["world_size"])]
    counts += [(f"shards[{k}].{f}", sh[f]) for k, sh in enumerate(shards) for f in ("rank", "start", "stop", "bytes")]
    bad = [name for name, v in counts if type(v) is not int]
    if bad:
        raise CheckpointCorrupt(f"manifest fields {bad} must be integers")
    if man["n"] < 0 or man["world_size"] < 1:
        raise CheckpointCorrupt(f"manifest fields n = {man['n']} and world_size = {man['world_size']} must be "
                                ">= 0 and >= 1")
    check_counters(man)
    opt = man.get("optimizer", "adamw")
    if not isinstance(opt, str) or opt not in OPTIMIZER_HYPER_KEYS:  # before extra.hyper: it says whose keys
        raise CheckpointMismatch(f"optimizer {_short(man['optimizer'])} is not one of {list(OPTIMIZER_HYPER_KEYS)}")
    if not isinstance(man["precision"], str) or man["precision"] not in PRECISIONS:
        raise CheckpointMismatch(f"precision {_short(man['precision'])} is not one of {list(PRECISIONS)}")
    if not isinstance(man["groups"], list) or not all(
            isinstance(g, list) and len(g) == 2 and all(type(x) is int for x in g) for g in man["groups"]):
        raise CheckpointCorrupt(f"manifest field groups must be [start, stop] integer pairs, got {_short(man['groups'])}")
    sections = man["sections"]
    if not isinstance(sections, list) or not sections or not all(
            isinstance(s, dict) and sorted(s) == ["dtype", "name"] and isinstance(s["name"], str)
            and isinstance(s["dtype"], str) and s["dtype"] in NP_DTYPES for s in sections):
        raise CheckpointCorrupt(f"manifest field sections must be {{name, dtype}} objects with dtypes of "
                                f"{list(NP_DTYPES)}, got {_short(sections)}")
    if not isinstance(man["extra"], dict):
        raise CheckpointCorrupt(f"manifest field extra must be an object, got {type(man['extra']).__name__}")
    if "hyper" in man["extra"]:
        _check_saved_hyper(man["extra"]["hyper"], man.get("optimizer", "adamw"))
    for k, sh in enumerate(shards):
        f, sha = sh["file"], sh["sha256"]
        if not (isinstance(f, str) and re.fullmatch(r"[\w.-]+", f, re.ASCII) and f not in (".", "..")):
            raise CheckpointCorrupt(f"bad shard entry shards[{k}]: file {_short(f)} is not a plain file name")
        if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
            raise CheckpointCorrupt(f"bad shard entry shards[{k}]: sha256 {_short(sha)} is not a SHA-256")


def _check_saved_hyper(saved: Any, optimizer: str) -> None:
    """``extra.hyper``: one object per group with exactly the optimizer's hyper-parameter keys, each
    valid. Nothing else is taken from it: a checkpoint sets hyper-parameters, never a group's parameters."""
    keys = OPTIMIZER_HYPER_KEYS[optimizer]
    if not isinstance(saved, list):
        raise CheckpointCorrupt(f"extra.hyper must be a list (one entry per parameter group), got {type(saved).__name__}")
    for i, h in enumerate(saved):
        try:
            if not isinstance(h, dict) or set(h) - set(keys):
                raise ValueError(f"extra.hyper[{i}] must hold only the hyper-parameters {list(keys)}, "
                                 f"got {_short(h)}")
            check_hyper(h, optimizer=optimizer)
        except (TypeError, ValueError, OverflowError) as e:  # float(10**400) overflows
            raise CheckpointCorrupt(f"parameter group {i}: {e}") from None


def check_manifest(man: dict, core: Any, layout: Any, where: str = "manifest.json") -> None:
    """A manifest from :func:`parse_manifest` against ``core``: :class:`CheckpointMismatch` for
    another model or optimizer, :class:`CheckpointCorrupt` for a shard table that does not tile."""
    try:
        _check_against(man, core, layout)
    except CheckpointError as e:
        raise type(e)(f"{where}: {e}") from None


def _check_against(man: dict, core: Any, layout: Any) -> None:
    expect_equal("optimizer", man.get("optimizer", "adamw"), core.optimizer)
    expect_equal("number of parameters", man["n"], core.n)
    expect_equal("precision", man["precision"], core.precision)
    expect_equal("state sections", man["sections"], _sections_of(core))
    expect_equal("parameter groups", man["groups"], [[g.start, g.stop] for g in core.groups])
    if layout is not None:
        if not isinstance(man["layout"], list):
            raise CheckpointMismatch(f"layout: {_short(man['layout'])} in the checkpoint, one entry per parameter here")
        check_layout(man["layout"], layout)
    if len(man["extra"].get("hyper", core.groups)) != len(core.groups):
        raise CheckpointMismatch(f"parameter groups: {len(man['extra']['hyper'])} in the checkpoint, "
                                 f"{len(core.groups)} here")
    w, shards = man["world_size"], man["shards"]
    if len(shards) != w or [(s["start"], s["stop"]) for s in shards] != [shard_range(core.n, w, r) for r in range(w)]:
        raise CheckpointCorrupt(f"shard table does not tile {core.n} elements over {w!r} ranks")
    per_elem = sum(NP_DTYPES[s["dtype"]].itemsize for s in man["sections"])
    for k, sh in enumerate(shards):
        if sh["rank"] != k or sh["bytes"] != (sh["stop"] - sh["start"]) * per_elem:
            raise CheckpointCorrupt(f"bad shard entry shards[{k}]: rank {sh['rank']}, bytes {sh['bytes']} for "
                                    f"[{sh['start']}, {sh['stop']}) at {per_elem} bytes per element")


# ---- sharded folders: save and load -----------------------------------------------------------------

def _sections_of(core: Any) -> list[dict]:
    return [{"name": nm, "dtype": as_view(t, nm).dtype} for nm, t in core.state_sections()]


def _raise_together(comm: Any, err: CheckpointError | None) -> None:
    """Collective: every rank raises the first failing rank's error (same class and message)."""
    first = comm.first(err and (type(err).__name__, str(err)))
    if first is not None:
        cls = {c.__name__: c for c in (CheckpointCorrupt, CheckpointMismatch)}.get(first[0], CheckpointError)
        raise cls(first[1]) from err


def _remove(paths: Any) -> None:  # best effort: what is left is removed by the next save
    for p in paths:
        with contextlib.suppress(OSError):
            p.unlink()


def save_sharded(core: Any, path: str | os.PathLike, layout: Any = None, extra: dict | None = None) -> None:
    """Write ``core``'s (a core of ``srkern.sharded``) sharded state to folder ``path``; collective.

    Rank 0's token file, read back by every rank, proves one shared folder before anything is
    written; then a new generation, the manifest's rename, the cleanup (see the module). Any failure
    raises :class:`CheckpointError` on every rank, and the checkpoint already there stays."""
    comm, folder = core.comm, Path(path)
    r, w = comm.rank, comm.size
    err, token = "", ""
    if r == 0:  # every rank takes part in the bcast, whether or not the mkdir worked
        try:
            token = secrets.token_hex(8)
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / (_TOKEN + token), "xb") as f:
                f.write(token.encode())
        except Exception as e:
            err = f"rank 0: {type(e).__name__}: {e}"
    err, token = comm.mpi.bcast((err, token), root=0)  # also: nobody writes before the folder exists
    if err:
        raise CheckpointError(f"saving checkpoint to {folder} failed: {err}")
    probe = folder / (_TOKEN + token)
    try:
        err = "" if read_regular(probe, 64) == token.encode() else f"rank {r} reads another token in {probe}"
    except Exception as e:
        err = f"rank {r} cannot read {probe}, which rank 0 wrote ({type(e).__name__}: {e})"
    err = comm.first(err) or ""  # the first rank's error, the same on every rank
    if err:
        _remove([probe] if r == 0 else [])
        raise CheckpointError(f"saving checkpoint to {folder} failed, nothing written: the ranks do not see the "
                              f"same folder ({err}); all ranks must save to one folder on a shared file system")
    name = f"step-{core.step_count:010d}-gen-{token}-rank-{r:05d}-of-{w:05d}.bin"
    info, err = None, ""
    try:
        data = b"".join(host_bytes(t) for _, t in core.state_sections())
        atomic_write(folder / name, data)  # file and folder fsynced before it returns
        info = {"rank": r, "start": core.start, "stop": core.stop, "file": name,
                "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    except Exception as e:  # reported on every rank below
        err = f"rank {r}: {type(e).__name__}: {e}"
    infos = comm.mpi.gather((info, err), root=0)
    switched = False
    if r == 0:
        errs, blob = [e for _, e in infos if e], b""
        try:
            if not errs:
                blob = seal_manifest({
                    "format": SHARDED_FORMAT, "format_version": SHARDED_VERSION,
                    "contract_version": _contract.CONTRACT_VERSION, "world_size": w, "step": core.step_count,
                    "seed": core.seed, "precision": core.precision, "n": core.n,
                    "groups": [[g.start, g.stop] for g in core.groups], "sections": _sections_of(core),
                    "layout": layout, "extra": extra or {}, "shards": [i for i, _ in infos],
                    # AdamW's folders stay as they were (no field: "adamw"); the others name theirs
                    **({} if core.optimizer == "adamw" else {"optimizer": core.optimizer})})
                replace_file(folder / "manifest.json", blob)  # the switch: one rename
                switched = True
                sync_folder(folder)  # the rename (and the shards' names) survive a crash
        except Exception as e:
            errs.append(f"rank 0: {type(e).__name__}: {e}")
        if switched:  # now, and only now, the older generations go
            with contextlib.suppress(OSError):
                _remove([f for f in folder.iterdir() if f.name not in {i["file"] for i, _ in infos}
                         and _OURS.fullmatch(f.name)])
        err = "; ".join(errs)
    err, switched = comm.mpi.bcast((err, switched), root=0)
    if err and switched:  # only the folder's fsync can fail after the rename
        raise CheckpointError(f"saving checkpoint to {folder}: the new checkpoint is in place, but it may not "
                              f"survive a crash of this machine: {err}")
    if err:  # remove this save's own files, never the old checkpoint's
        _remove(([folder / name] if info is not None else []) + ([probe] if r == 0 else []))
        raise CheckpointError(f"saving checkpoint to {folder} failed: {err}")


def load_sharded(core: Any, path: str | os.PathLike, layout: Any = None) -> dict:
    """Read folder ``path`` into ``core``'s shard sections (collective); returns the manifest.

    Rank 0 broadcasts the manifest's bytes; every rank checks them (:func:`parse_manifest`,
    :func:`check_manifest`). Each shard must be a regular file (opened without blocking) of the
    manifest's size, verified (SHA-256) by some rank before any rank writes a buffer. Any problem
    raises the same :class:`CheckpointError` subclass on every rank and loads nothing."""
    comm, folder = core.comm, Path(path)
    where = folder / "manifest.json"
    raw, err = b"", ""
    if comm.rank == 0:
        try:
            raw = read_regular(where, MANIFEST_LIMIT)
        except Exception as e:
            err = f"cannot read {where}: {e}"
    raw, err = comm.mpi.bcast((raw, err), root=0)  # bytes: each rank decodes, so all fail alike
    mine: CheckpointError | None = CheckpointCorrupt(err) if err else None
    man: dict = {}
    try:
        if mine is None:
            man = parse_manifest(raw, str(where))
            check_manifest(man, core, layout, str(where))
    except CheckpointError as e:
        mine = e
    except Exception as e:  # a bug, not a bad file: still refused on every rank, never on one only
        mine = CheckpointCorrupt(f"{where} is malformed: {type(e).__name__}: {e}")
    _raise_together(comm, mine)
    # Read and verify: the files overlapping this rank's new shard, plus every world-th file,
    # so that each file is verified by some rank before anyone loads anything.
    sec = [(s["name"], NP_DTYPES[s["dtype"]].itemsize) for s in man["sections"]]
    blobs: dict[int, bytes] = {}
    err = ""
    for k, sh in enumerate(man["shards"]):
        overlaps = sh["start"] < core.stop and core.start < sh["stop"]
        if err or not (overlaps or k % comm.size == comm.rank):
            continue
        f, want = folder / sh["file"], sh["bytes"]
        try:
            with open_regular(f) as fh:
                size = os.fstat(fh.fileno()).st_size  # before any read: a 40 GiB sparse file is never read
                data = fh.read(want) if size == want else b""
        except OSError as e:
            err = f"shard {k}: cannot read {f}: {e}"
            continue
        except Exception as e:  # MemoryError and the like: reported on every rank below
            err = f"shard {k}: reading {f} failed: {type(e).__name__}: {e}"
            continue
        if size != want or len(data) != want:
            err = f"shard {k}: {f} has {size} bytes, expected {want} ({'truncated?' if size < want else 'too long'})"
        elif hashlib.sha256(data).hexdigest() != sh["sha256"]:
            err = f"shard {k}: {f} fails its SHA-256 check (corrupted)"
        elif overlaps:
            blobs[k] = data
    err = comm.first(err) or ""  # the first rank's error, the same on every rank
    if err:
        raise CheckpointCorrupt(f"checkpoint {folder} refused, nothing loaded: {err}")
    # All verified everywhere: now copy the overlapping ranges into this rank's state.
    state = dict(core.state_sections())
    for k, data in blobs.items():
        sh = man["shards"][k]
        a, b = max(sh["start"], core.start), min(sh["stop"], core.stop)
        pos = 0
        for name, sz in sec:
            lo = pos + (a - sh["start"]) * sz
            write_host_bytes(state[name][a - core.start:b - core.start], memoryview(data)[lo:lo + (b - a) * sz])
            pos += (sh["stop"] - sh["start"]) * sz
    return man
