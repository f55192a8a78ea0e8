"""Sharded checkpoints and AdamW state dicts under attack (issue 11): nothing lost, nothing foreign
loaded, no silent corruption, no hang, clear errors.

Most tests run in this process: a ``ShardedAdamWCore`` works on an mpi4py singleton (world 1),
and loading a world-2 folder into it re-shards. The state is written straight into the buffers
(tests/_ckpt_worker.py's variants OLD, NEW, OTHER: different random bits per section), so no
kernel runs and the old checkpoint, the new one and the loader's own state differ in every
buffer. Refusals assert the cause (class and message) and that every bit of the optimizer is
unchanged. Multi-rank cases run tests/_ckpt_worker.py under ``mpirun -n 2`` with a hard limit;
crashes run in child processes that an audit hook ends (``os._exit``) at a chosen file operation.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import srkern.checkpoint as ckpt
from srkern.checkpoint import CheckpointCorrupt, CheckpointError, CheckpointMismatch, seal_manifest
from srkern.comm import Communicator

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ckpt_worker as worker  # noqa: E402
from conftest import child_env, run_mpi  # noqa: E402

torch = pytest.importorskip("torch")
import srkern.torch as srt  # noqa: E402
from test_torch_optim import _set  # noqa: E402 (one state-dict damage helper)

WORKER = Path(worker.__file__)
OLD, NEW, OTHER = worker.OLD, worker.NEW, worker.OTHER
attack = pytest.mark.attack


@pytest.fixture(scope="module")
def comm() -> Communicator:
    return Communicator()  # MPI.COMM_WORLD of this process: world size 1


def which(core, new_step: int) -> str:
    """'old' or 'new': the checkpoint ``core`` now holds (else the test fails)."""
    if worker.is_variant(core, OLD, 3):
        return "old"
    if worker.is_variant(core, NEW, new_step):
        return "new"
    pytest.fail("the loaded state is neither the old checkpoint nor the new one")


def loaded(comm, folder: Path, new_step: int = 3, when: str = "") -> str:
    """'old' or 'new': what folder ``folder`` holds, loaded into a fresh core that held neither
    (the test fails if it loads neither, or does not load)."""
    target = worker.make_core(comm, OTHER, 9)
    try:
        target.load(folder)
    except CheckpointError as e:
        pytest.fail(f"{when}neither checkpoint loads: {e}")
    return which(target, new_step)


def shard_names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.endswith(".bin")}


def mpi_fail(res) -> str:
    return f"exit {res.returncode}\n--- stdout\n{res.stdout[-2000:]}\n--- stderr\n{res.stderr[-4000:]}"


# ---- A. generations: a crash at any point leaves the old checkpoint or the new one ---------------

@attack("checkpoint-loss")
def test_save_killed_at_each_file_operation_leaves_old_or_new(comm, tmp_path):
    # One process saves the old checkpoint (step 3), then the new one, and is ended by an audit
    # hook at its k-th file operation (open for writing, rename, remove, mkdir) for k = 1, 2, ...
    # until a save completes. Case "same-step": the new one has the same step and world size, so
    # its shard names used to be the old ones, and the new shard replaced the old before the
    # manifest switched (neither loaded). Each folder must load the old state or the new one bit
    # for bit, old up to one crash point and new from there on.
    res = subprocess.run([sys.executable, str(WORKER), "crash-loop", "--out", str(tmp_path)], env=child_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    codes = json.loads((tmp_path / "crash-loop.json").read_text())["codes"]
    for case, new_step in worker.CRASH_CASES.items():
        c = codes[case]
        assert c[-1] == 0 and set(c[:-1]) == {worker.CRASH_EXIT}, f"{case}: exit codes {c}"
        # mkdir, token, shard (temporary file, rename), manifest (temporary file, rename), removals
        assert len(c) - 1 >= 7, f"{case}: only {len(c) - 1} crash points: the hook missed the save"
        seen = []
        for k in range(1, len(c) + 1):
            seen.append(loaded(comm, tmp_path / case / f"k{k}", new_step,
                               f"{case}: killed at file operation {k} of the save, "))
        assert seen[0] == "old" and seen[-1] == "new", f"{case}: {seen}"
        assert seen == sorted(seen, key=["old", "new"].index), f"{case}: the folder switched twice: {seen}"


@pytest.mark.mpi
@attack("checkpoint-loss")
@pytest.mark.parametrize("die,expect", [("0:1:manifest.json", "old"), ("1:2", "old"),
                                        ("0:1:-rank-:os.remove", "new")],
                         ids=["rank0-at-the-manifest", "rank1-at-its-shard-rename",
                              "rank0-removing-the-old-generation"])
def test_rank_killed_mid_save_leaves_old_or_new(comm, tmp_path, die, expect):
    # World 2 saves the old checkpoint, then the new one at the same step; one rank is ended with
    # os._exit mid-save (rank 0 when it opens the new manifest, after both shards are in place;
    # rank 1 just before it renames its shard: the old one stays; rank 0 at its first removal of
    # an old shard, after the switch: the new one is in place). The folder (loaded here on one
    # rank, so re-sharded) must hold that state, bit for bit.
    res = run_mpi(2, WORKER, "crash", "--out", str(tmp_path), "--die", die, timeout=60)
    assert res.returncode != 0 and not (tmp_path / "crash.json").exists(), "no rank was killed: " + mpi_fail(res)
    assert loaded(comm, tmp_path / "ckpt", when=f"killed at {die}: ") == expect


@attack("checkpoint-loss")
def test_two_saves_of_one_step_are_two_generations(comm, tmp_path):
    # The second save of the same step writes new names, and once its manifest is in place the
    # first generation is gone (with the token file): only the manifest and one shard remain.
    core = worker.make_core(comm, OLD, 3)
    core.save(tmp_path)
    first = shard_names(tmp_path)
    worker.set_state(core, NEW, 3)
    core.save(tmp_path)
    second = shard_names(tmp_path)
    assert not first & second, f"the new generation reused the names {first & second}"
    assert {p.name for p in tmp_path.iterdir()} == second | {"manifest.json"}
    assert loaded(comm, tmp_path) == "new"


@attack("checkpoint-loss")
def test_failed_save_keeps_the_old_checkpoint_and_removes_its_own_files(comm, tmp_path, monkeypatch):
    # The manifest cannot be written (injected: disk full): save raises, the old checkpoint still
    # loads bit for bit, and the new generation's shard is removed again.
    core = worker.make_core(comm, OLD, 3)
    core.save(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    real = ckpt.replace_file

    def full_disk(path, data):
        if Path(path).name == "manifest.json":
            raise OSError(28, "No space left on device (injected)")
        real(path, data)

    monkeypatch.setattr(ckpt, "replace_file", full_disk)
    worker.set_state(core, NEW, 3)
    with pytest.raises(CheckpointError, match=re.escape("No space left on device (injected)")):
        core.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert loaded(comm, tmp_path) == "old"


@attack("checkpoint-loss")
def test_failure_after_the_switch_keeps_the_new_checkpoint(comm, tmp_path, monkeypatch):
    # The manifest is renamed, then the folder's fsync fails: the new checkpoint is the one in
    # place (its shards are not removed as if the save had failed before the switch), and the
    # error says so.
    core = worker.make_core(comm, OLD, 3)
    core.save(tmp_path)

    def sync_fails(folder):
        raise OSError(5, "Input/output error (injected)")

    monkeypatch.setattr(ckpt, "sync_folder", sync_fails)
    worker.set_state(core, NEW, 3)
    with pytest.raises(CheckpointError, match="the new checkpoint is in place, but it may not survive"):
        core.save(tmp_path)
    monkeypatch.undo()
    assert loaded(comm, tmp_path) == "new"


# ---- B. ranks that see different folders ------------------------------------------------------------

@pytest.mark.mpi
@attack("checkpoint-loss")
def test_ranks_seeing_different_folders_refused_before_anything_is_written(comm, tmp_path):
    # Node-local disks, simulated: rank 0 saves to the shared folder holding the good checkpoint,
    # rank 1 to a folder of its own. Every rank raises CheckpointError naming the cause, nothing
    # is written into either folder, and the good checkpoint loads bit for bit. The same launch:
    # two saves of one step at world 2 (disjoint generations, the first removed), re-sharded here.
    res = run_mpi(2, WORKER, "folders", "--out", str(tmp_path), timeout=60)
    assert res.returncode == 0, mpi_fail(res)
    r = json.loads((tmp_path / "folders.json").read_text())
    raised = r["different"]["raised"]
    assert all(x is not None and x[0] == "CheckpointError" for x in raised), f"save returned on some rank: {raised}"
    for (_, msg), folder in zip(raised, ("shared", "node-local-1"), strict=True):  # each rank names its own folder
        assert msg.startswith(f"saving checkpoint to {tmp_path / folder} failed, nothing written: the ranks do "
                              f"not see the same folder (rank 1 cannot read {tmp_path / 'node-local-1'}/"), msg
        assert "all ranks must save to one folder on a shared file system" in msg
    assert all(r["shared_unchanged"]) and all(r["local_empty"]), r
    assert loaded(comm, tmp_path / "shared") == "old"
    first, second = ({n for n in names if n.endswith(".bin")} for names in r["twice"].values())
    assert len(first) == len(second) == 2 and not first & second, r["twice"]
    assert set(r["twice"]["second"]) == second | {"manifest.json"}
    target = worker.make_core(comm, OTHER, 9)
    target.load(tmp_path / "twice")
    assert worker.is_variant(target, OTHER, 4)


# ---- C, D, F. the manifest: checksum, every field, nothing applied before everything is checked -----

def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).to(torch.bfloat16)


def _sharded(comm, variant: int, step: int):
    """A torch ShardedAdamW with two groups, its buffers filled with the bits of ``variant``."""
    m = _model()
    ps = list(m.parameters())
    opt = srt.ShardedAdamW([{"params": ps[:2]}, {"params": ps[2:], "lr": 2e-3, "weight_decay": 0.0}], comm,
                           lr=1e-3 * variant, precision="bf16-kahan", seed=worker.SEED + variant)
    g = torch.Generator().manual_seed(variant)
    for _, t in opt.core.state_sections():
        t.copy_(torch.randn(t.shape, generator=g).abs().to(t.dtype))
    opt.core.step_count = step
    return opt


def _snapshot(opt) -> tuple:
    bits = [t.view(torch.int16).clone() for _, t in opt.core.state_sections()]
    bits.append(opt.flat_params.view(torch.int16).clone())
    groups = [({k: v for k, v in g.items() if k != "params"}, [id(p) for p in g["params"]]) for g in opt.param_groups]
    return bits, opt.core.step_count, opt.core.seed, groups


def assert_unchanged(opt, before: tuple, what: str) -> None:
    after = _snapshot(opt)
    for i, (a, b) in enumerate(zip(after[0], before[0], strict=True)):
        assert torch.equal(a, b), f"{what}: buffer {i} changed"
    assert after[1:] == before[1:], f"{what}: step, seed or param_groups changed: {after[1:]} vs {before[1:]}"


@pytest.fixture(scope="module")
def saved(comm, tmp_path_factory):
    """A good folder of a ShardedAdamW at step 3, its manifest fields, and a target optimizer."""
    folder = tmp_path_factory.mktemp("good")
    src = _sharded(comm, OLD, 3)
    src.save(folder)
    return folder, json.loads((folder / "manifest.json").read_text()), _sharded(comm, OTHER, 5), src


def _edit(fn, seal=True):
    def hurt(folder, man):
        man = copy.deepcopy(man)
        fn(man)
        raw = seal_manifest(man) if seal else json.dumps(man).encode()
        (folder / "manifest.json").write_bytes(raw)
    return hurt


def _raw(data: bytes):
    return lambda folder, man: (folder / "manifest.json").write_bytes(data)


def _hyper(key, value):
    return lambda m: m["extra"]["hyper"][0].__setitem__(key, value)


def _shard(key, value):
    return lambda m: m["shards"][0].__setitem__(key, value)


def _flip_shard(folder, man):
    f = folder / man["shards"][0]["file"]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))


def _truncate_shard(folder, man):
    f = folder / man["shards"][0]["file"]
    f.write_bytes(f.read_bytes()[:-3])


# name: (the damage, area, the error class, words of the message that name the cause)
REFUSED = {
    # C: hand edits without a new checksum are refused by it
    "step 3->7": (_edit(lambda m: m.update(step=7), seal=False), "corruption", CheckpointCorrupt, "manifest_sha256"),
    "seed": (_edit(lambda m: m.update(seed=m["seed"] + 1), seal=False), "corruption", CheckpointCorrupt,
             "manifest_sha256"),
    "lr->100": (_edit(_hyper("lr", 100.0), seal=False), "corruption", CheckpointCorrupt, "manifest_sha256"),
    "no checksum": (_edit(lambda m: m.pop("manifest_sha256"), seal=False), "corruption", CheckpointCorrupt,
                    "checksum manifest_sha256 (missing)"),
    "version 1": (_edit(lambda m: (m.update(format_version=1), m.pop("manifest_sha256")), seal=False), "error",
                  CheckpointMismatch, "version 1): v1 folders have no manifest checksum"),
    # C, D: sealed (a consistent checksum), so each field's own check must answer
    "params in a hyper entry": (_edit(_hyper("params", [])), "corruption", CheckpointCorrupt,
                                "extra.hyper[0] must hold only the hyper-parameters"),
    "unknown field": (_edit(lambda m: m.update(params=[0])), "corruption", CheckpointCorrupt,
                      "unknown manifest fields ['params']"),
    "lr NaN": (_edit(_hyper("lr", float("nan")), seal=False), "corruption", CheckpointCorrupt,
               "number NaN is not a finite float"),
    "lr 'fast'": (_edit(_hyper("lr", "fast")), "corruption", CheckpointCorrupt,
                  "parameter group 0: lr must be a real number, got str"),
    "eps 1e-50": (_edit(_hyper("eps", 1e-50)), "corruption", CheckpointCorrupt, "parameter group 0: eps"),
    "hyper 5": (_edit(lambda m: m["extra"].update(hyper=5)), "error", CheckpointCorrupt, "extra.hyper must be a list"),
    "hyper short": (_edit(lambda m: m["extra"]["hyper"].pop()), "corruption", CheckpointMismatch,
                    "parameter groups: 1 in the checkpoint, 2 here"),
    "extra a list": (_edit(lambda m: m.update(extra=[1])), "error", CheckpointCorrupt,
                     "manifest field extra must be an object, got list"),
    "start 72.0": (_edit(_shard("start", 72.0)), "error", CheckpointCorrupt,
                   "manifest fields ['shards[0].start'] must be integers"),
    "step -1": (_edit(lambda m: m.update(step=-1)), "corruption", CheckpointCorrupt, "step must be in [0, 2**32)"),
    "seed 2**64": (_edit(lambda m: m.update(seed=2**64)), "corruption", CheckpointCorrupt,
                   "seed must be in [0, 2**64)"),
    "seed 3.0": (_edit(lambda m: m.update(seed=3.0)), "corruption", CheckpointCorrupt,
                 "seed must be an integer, got float"),
    "step '3'": (_edit(lambda m: m.update(step="3")), "corruption", CheckpointCorrupt,
                 "step must be an integer, got str"),
    "path outside": (_edit(_shard("file", "../x.bin")), "corruption", CheckpointCorrupt, "is not a plain file name"),
    "sha not hex": (_edit(_shard("sha256", "z" * 64)), "corruption", CheckpointCorrupt, "is not a SHA-256"),
    "bytes vs range": (_edit(_shard("bytes", 1)), "corruption", CheckpointCorrupt, "bad shard entry shards[0]: rank 0, "),
    "bad dtype": (_edit(lambda m: m["sections"][1].update(dtype="float128")), "corruption", CheckpointCorrupt,
                  "manifest field sections must be"),
    "bad groups": (_edit(lambda m: m.update(groups=[[0, "x"]])), "error", CheckpointCorrupt,
                   "manifest field groups must be"),
    "another precision": (_edit(lambda m: m.update(precision="bf16-sr")), "error", CheckpointMismatch,
                          "precision: 'bf16-sr' in the checkpoint, 'bf16-kahan' here"),
    # F: the shape of the JSON itself
    "a JSON list": (_raw(b"[1, 2]"), "error", CheckpointCorrupt, "a JSON object was expected, got list"),
    "null": (_raw(b"null"), "error", CheckpointCorrupt, "a JSON object was expected, got NoneType"),
    "deep nesting": (_raw(b"[" * 100_000 + b"]" * 100_000), "error", CheckpointCorrupt, "nested too deeply"),
    "not UTF-8": (_raw(b'{"format": "\xff"}'), "error", CheckpointCorrupt, "is not valid UTF-8"),
    "duplicate key": (lambda f, m: (f / "manifest.json").write_bytes(
        seal_manifest(m).replace(b'"step":', b'"step": 7, "step":', 1)), "corruption", CheckpointCorrupt,
        "duplicate keys"),
    "shard a string": (_edit(lambda m: m["shards"].__setitem__(0, "x")), "error", CheckpointCorrupt,
                       "bad shard entry shards[0]: 'x' is not an object"),
    "world_size 2.5": (_edit(lambda m: m.update(world_size=2.5)), "error", CheckpointCorrupt,
                       "manifest fields ['world_size'] must be integers"),
    "world_size '2'": (_edit(lambda m: m.update(world_size="2")), "error", CheckpointCorrupt,
                       "manifest fields ['world_size'] must be integers"),
    "world_size 2": (_edit(lambda m: m.update(world_size=2)), "error", CheckpointCorrupt,
                     "shard table does not tile 39 elements over 2 ranks"),
    # the shard files: a SHA mismatch and a truncation name their own cause
    "shard bit flip": (_flip_shard, "corruption", CheckpointCorrupt, "fails its SHA-256 check (corrupted)"),
    "shard truncated": (_truncate_shard, "corruption", CheckpointCorrupt, "(truncated?)"),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=attack(v[1]), id=re.sub(r"\W+", "-", c))
                                  for c, v in REFUSED.items()])
def test_damaged_manifest_refused_and_nothing_changed(saved, tmp_path, case):
    # Each damage raises its own cause (class and message) and changes no bit of the target
    # optimizer: buffers, weights, step, seed, every group's settings and parameters.
    good, man, target, _ = saved
    hurt, _, cls, words = REFUSED[case]
    bad = tmp_path / "ckpt"
    shutil.copytree(good, bad)
    hurt(bad, man)
    before = _snapshot(target)
    with pytest.raises(cls, match=re.escape(words)):
        target.load(bad)
    assert_unchanged(target, before, case)


@attack("error")
def test_sha_truncation_and_manifest_errors_differ(saved, tmp_path):
    # The three causes a user must tell apart give three different messages.
    good, man, target, _ = saved
    msgs = []
    for case in ("shard bit flip", "shard truncated", "step 3->7"):
        bad = tmp_path / re.sub(r"\W+", "-", case)
        shutil.copytree(good, bad)
        REFUSED[case][0](bad, man)
        with pytest.raises(CheckpointCorrupt) as e:
            target.load(bad)
        msgs.append(str(e.value).replace(str(bad), ""))
    assert len(set(msgs)) == 3, msgs
    assert "SHA-256 check" in msgs[0] and "truncated" in msgs[1] and "manifest_sha256" in msgs[2]


def test_good_checkpoint_loads_bit_exact_with_its_hyper_parameters(saved):
    # The control case: the good folder loads, every buffer, step, seed and group setting.
    good, _, target, src = saved
    before = _snapshot(target)
    try:
        target.load(good)
        (bits, *rest, groups), (want, *want_rest, want_groups) = _snapshot(target), _snapshot(src)
        assert all(torch.equal(a, b) for a, b in zip(bits, want, strict=True))
        assert rest == want_rest and [h for h, _ in groups] == [h for h, _ in want_groups]
    finally:
        _restore(target, before)


def _restore(opt, snap: tuple) -> None:
    bits, step, seed, groups = snap
    for (_, t), b in zip(opt.core.state_sections(), bits[:-1], strict=True):
        t.view(torch.int16).copy_(b)
    opt.flat_params.view(torch.int16).copy_(bits[-1])
    opt.core.step_count, opt.core.seed = step, seed
    for g, (h, _) in zip(opt.param_groups, groups, strict=True):
        g.update(h)


# ---- G. fuzz: a mutated manifest loads exactly what it says, or is refused with nothing changed -----

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([0, 1, -1, 39, 2**32, 2**63, 2**64, 10**400, -0.0, 1e-50, 1e300, "", "bfloat16", "NaN"])
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)


def _paths(v, at=()):
    """Every (path) to a value inside a JSON document, the document's own fields first."""
    out = []
    items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
    for k, x in items:
        out.append(at + (k,))
        out += _paths(x, at + (k,))
    return out


def _canonical(man: dict) -> str:
    return json.dumps({k: v for k, v in man.items() if k != "manifest_sha256"}, sort_keys=True)


@pytest.fixture(scope="module")
def fuzz_target(saved, tmp_path_factory):
    good, man, target, src = saved
    folder = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(good, folder, dirs_exist_ok=True)
    return folder, man, target, _snapshot(target), _snapshot(src), sorted(_paths(man), key=len)


@attack("fuzz")
@settings(max_examples=250, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_manifest_loads_what_it_says_or_is_refused(fuzz_target, data):
    # A field anywhere in the manifest is replaced by arbitrary JSON (or scaled, removed, a key added),
    # then the manifest is resealed (3 in 4: the field checks must answer) or not (the checksum
    # must). Loading either raises CheckpointError (never another exception) with every bit of
    # the optimizer unchanged, or succeeds and holds exactly what the manifest says: the shards'
    # bits, its step, seed and hyper-parameters; without a new checksum only a no-op may load.
    folder, man, target, pristine, loaded, paths = fuzz_target
    mutated = copy.deepcopy(man)
    path = data.draw(st.sampled_from(paths), label="path")
    op = data.draw(st.sampled_from(["replace", "replace", "nudge", "delete", "add key"]), label="op")
    parent = mutated
    for k in path[:-1]:
        parent = parent[k]
    if op == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif op == "add key" and isinstance(parent, dict):
        parent[data.draw(st.text(max_size=8), label="key")] = data.draw(JSON, label="value")
    elif op == "nudge" and type(parent[path[-1]]) in (int, float):  # often still valid: loads
        parent[path[-1]] *= data.draw(st.sampled_from([0, 0.5, 1, 2]), label="factor")
    else:
        parent[path[-1]] = data.draw(JSON, label="value")
    reseal = data.draw(st.sampled_from([True, True, True, False]), label="reseal")
    raw = seal_manifest(mutated) if reseal else json.dumps(mutated).encode()
    try:  # the pure checks themselves, without load's net for unexpected exceptions
        ckpt.check_manifest(ckpt.parse_manifest(raw), target.core, target._layout)
        valid = True
    except CheckpointError:
        valid = False
    (folder / "manifest.json").write_bytes(raw)
    _restore(target, pristine)
    try:
        target.load(folder)
    except CheckpointError:
        assert not valid, f"{op} at {path}: the checks passed, the load failed"
        assert_unchanged(target, pristine, f"refused {op} at {path}")
        return
    assert reseal or _canonical(mutated) == _canonical(man), f"an unsealed {op} at {path} was loaded"
    bits, step, seed, groups = _snapshot(target)
    for i, (a, b) in enumerate(zip(bits, loaded[0], strict=True)):
        assert torch.equal(a, b), f"{op} at {path} loaded: buffer {i} is not the shards' bits"
    assert (step, seed) == (mutated["step"], mutated["seed"])
    for (h, _), saved_h in zip(groups, mutated["extra"].get("hyper", [g for g, _ in pristine[3]]), strict=True):
        assert all(h[k] == (tuple(saved_h[k]) if k == "betas" else saved_h[k]) for k in ckpt.HYPER_KEYS)


@attack("fuzz")
@settings(max_examples=200, derandomize=True, deadline=None, database=None)
@given(data=st.data())
def test_fuzzed_manifest_bytes_parse_or_raise_checkpoint_error(saved, data):
    # The pure parser on byte-level damage (flips, cuts, insertions) of a sealed manifest: it
    # returns the very same fields (whitespace changes only) or raises CheckpointError.
    raw = bytearray((saved[0] / "manifest.json").read_bytes())
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        i = data.draw(st.integers(0, len(raw) - 1), label="at")
        kind = data.draw(st.sampled_from(["flip", "cut", "insert"]), label="kind")
        if kind == "flip":
            raw[i] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        elif kind == "cut":
            del raw[i:i + data.draw(st.integers(1, 40), label="n")]
        else:
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=4), label="bytes")
    try:
        got = ckpt.parse_manifest(bytes(raw))
    except CheckpointError:
        return
    assert got == saved[1]


# ---- E. hangs while loading: every rank raises within seconds -----------------------------------------

@pytest.mark.mpi
@attack("hang")
@pytest.mark.parametrize("case", ["utf8", "float-stop", "fifo-manifest", "fifo", "sparse"])
def test_damaged_checkpoint_raises_on_every_rank_quickly(tmp_path, case):
    # World 2 loads a damaged world-2 checkpoint: a manifest that is not UTF-8 (rank 0 used to
    # decode alone), a resealed float shard stop, the manifest or rank 1's shard replaced by a
    # FIFO (the open used to block), or that shard by a 40 GiB sparse file (read whole: MemoryError
    # on one rank). Each rank must raise the same CheckpointCorrupt naming the cause within
    # seconds, its state unchanged; a hang runs into the launch's 30 s limit and fails this test alone.
    res = run_mpi(2, WORKER, "hang", "--out", str(tmp_path), "--case", case, timeout=30)
    assert res.returncode == 0, mpi_fail(res)
    r = json.loads((tmp_path / "hang.json").read_text())
    raised = r["raised"]
    assert all(x is not None and x[0] == "CheckpointCorrupt" for x in raised), raised
    assert len({tuple(x) for x in raised}) == 1, f"the ranks raised different errors: {raised}"
    assert r["words"] in raised[0][1], raised[0][1]
    assert max(r["seconds"]) < 10, r["seconds"]
    assert all(r["unchanged"]), "a rank's state changed"


# ---- D. srkern.torch.AdamW state dicts: every check before any write ----------------------------------

def _adamw(seed: int):
    m = _model()
    opt = srt.AdamW([{"params": list(m.parameters())[:2]}, {"params": list(m.parameters())[2:], "lr": 3e-3}],
                    lr=1e-2, seed=seed)
    for t in (1, 2):
        for p in m.parameters():
            p.grad = torch.full_like(p, 0.1 * t * seed)
        opt.step()
    return m, opt


STATE_REFUSED = {
    "step -1": (_set("state", 0, "step", value=torch.tensor(-1.0)), CheckpointCorrupt,
                "state[0]['step'] must be a whole number in [0, 2**24), got tensor(-1.)"),
    "seed 2**64": (_set("param_groups", 0, "seed", value=2**64), CheckpointCorrupt, "seed must be in [0, 2**64)"),
    "seed '12x'": (_set("param_groups", 1, "seed", value="12x"), CheckpointCorrupt, "seed must be an integer, got str"),
    "seed 1.5": (_set("param_groups", 0, "seed", value=1.5), CheckpointCorrupt, "seed must be an integer, got float"),
    "step 2.5": (_set("state", 1, "step", value=2.5), CheckpointCorrupt,
                 "state[1]['step'] must be a whole number in [0, 2**24), got 2.5"),
    "step 'two'": (_set("state", 1, "step", value="two"), CheckpointCorrupt, "state[1]['step'] must be a whole number"),
    "state reshaped": (_set("state", 0, "exp_avg", value=lambda t: t.reshape(-1)), CheckpointMismatch,
                       "state[0]['exp_avg'] has shape (20,), parameter 0 has (4, 5)"),
    "state float16": (_set("state", 1, "exp_avg_sq", value=lambda t: t.half()), CheckpointMismatch,
                      "state[1]['exp_avg_sq'] is torch.float16; this optimizer keeps it as torch.bfloat16"),
    "state extra key": (_set("state", 1, "max_exp_avg_sq", value=torch.zeros(1)), CheckpointMismatch,
                        "(amsgrad state is refused)"),
    "state on meta": (_set("state", 0, "exp_avg", value=lambda t: t.to("meta")), CheckpointCorrupt,
                      "state[0]['exp_avg'] is not a dense tensor with data"),
    "state not a tensor": (_set("state", 0, "exp_avg", value=[1.0]), CheckpointCorrupt,
                           "state[0]['exp_avg'] is not a dense tensor"),
    "state key '0'": (lambda sd: sd["state"].__setitem__("0", sd["state"].pop(0)), CheckpointCorrupt,
                      "state entry '0': not a parameter position"),
    "params []": (_set("param_groups", 0, "params", value=[]), CheckpointMismatch,
                  "param_groups[0]['params']: [] in the checkpoint, [0, 1] (this optimizer's parameters) here"),
    "params swapped": (_set("param_groups", 0, "params", value=[1, 0]), CheckpointMismatch,
                       "param_groups[0]['params']: [1, 0] in the checkpoint"),
    "lr NaN": (_set("param_groups", 1, "lr", value=float("nan")), CheckpointCorrupt, "parameter group 1: lr"),
    "lr 'fast'": (_set("param_groups", 0, "lr", value="fast"), CheckpointCorrupt,
                  "parameter group 0: lr must be a real number, got str"),
    "not a dict": (lambda sd: sd.clear() or sd.update(srkern=[]), CheckpointMismatch, "not an optimizer state dict"),
    "srkern entry a list": (_set("srkern", value=[]), CheckpointCorrupt, "the 'srkern' entry must be a dict"),
}


@attack("corruption")
@pytest.mark.parametrize("case", list(STATE_REFUSED), ids=[re.sub(r"\W+", "-", c) for c in STATE_REFUSED])
def test_adamw_state_dict_refused_and_nothing_changed(case):
    # The target has stepped twice with its own seed: after each refusal every parameter, state
    # tensor, its step, seed and every group's settings keep their bits.
    hurt, cls, words = STATE_REFUSED[case]
    _, src = _adamw(1)
    sd = copy.deepcopy(src.state_dict())
    hurt(sd)
    m, target = _adamw(2)

    def snap():
        tensors = [p.detach().clone() for p in m.parameters()]
        tensors += [t.clone() for p in m.parameters() for t in target.state[p].values()]
        groups = [({k: v for k, v in g.items() if k != "params"}, [id(p) for p in g["params"]])
                  for g in target.param_groups]
        return tensors, target.seed, groups

    before = snap()
    with pytest.raises(cls, match=re.escape(words)):
        target.load_state_dict(sd)
    after = snap()
    assert after[1:] == before[1:]
    for a, b in zip(after[0], before[0], strict=True):
        assert a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.int16), b.reshape(-1).view(torch.int16))
