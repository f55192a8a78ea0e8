"""Adversarial distributed cases (issue 11): ranks that disagree, a bad argument or a missing
gradient on one rank only, a body of ``abort_on_error`` left by ``sys.exit``, a replaced
``flat_grads``, and communicators that are not srkern's.

Each test launches one scenario of ``tests/_dist_attack_worker.py`` under mpirun with a hard
limit (``conftest.run_mpi``), so a hang fails that test alone; every rank writes one line per case
to its own file (``rank R case C raised <Type>: <message>``) and the test checks the line of every
rank. Before
the fixes these cases were accepted on every rank (a mixed model), raised on one rank while the
others waited forever, or ran past the heap.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import child_env, run_mpi

pytestmark = pytest.mark.mpi

WORKER = Path(__file__).resolve().parent / "_dist_attack_worker.py"
TIMEOUT_S = 30  # per launch; a fixed case ends in a few seconds, a hang runs into this limit


class Run:
    """One finished launch: its process, wall time and what the ranks wrote (``lines``)."""

    def __init__(self, res: subprocess.CompletedProcess, elapsed: float, out: Path) -> None:
        self.res, self.elapsed = res, elapsed
        self.lines = "".join(f.read_text() for f in sorted(out.glob("rank-*.txt")))

    def __str__(self) -> str:
        return (f"exit {self.res.returncode} after {self.elapsed:.1f} s\n--- ranks\n{self.lines[-3000:]}"
                f"\n--- stdout\n{self.res.stdout[-2000:]}\n--- stderr\n{self.res.stderr[-3000:]}")


def launch(k: int, scenario: str, out: Path) -> Run:
    t0 = time.monotonic()
    res = run_mpi(k, WORKER, scenario, str(out), timeout=TIMEOUT_S)
    return Run(res, time.monotonic() - t0, out)


def outcomes(run: Run, k: int, case: str) -> list[str]:
    """What each of the ``k`` ranks wrote for ``case`` ("raised T: msg" or "accepted")."""
    found = dict(re.findall(rf"^rank (\d+) case {re.escape(case)} ((?:raised|accepted).*)$", run.lines, re.M))
    missing = [r for r in range(k) if str(r) not in found]
    assert not missing, f"case {case}: no outcome from ranks {missing} (a hang?)\n{run}"
    return [found[str(r)] for r in range(k)]


def assert_raised_everywhere(run: Run, k: int, case: str, exc: str, words: str,
                             unchanged: bool = False) -> None:
    """Every rank raised ``exc`` with ``words`` in its message, and (``unchanged``) kept its state."""
    got = outcomes(run, k, case)
    for r, line in enumerate(got):
        assert line.startswith(f"raised {exc}:") and words in line, f"case {case}, rank {r}: {line}"
    if unchanged:
        for r in range(k):
            assert f"rank {r} case {case} unchanged\n" in run.lines, f"case {case}: rank {r} changed state"


def finished(run: Run, k: int) -> None:
    """The job ended normally on every rank, well before the limit."""
    assert run.res.returncode == 0 and all(f"rank {r} done\n" in run.lines for r in range(k)), str(run)
    assert run.elapsed < TIMEOUT_S - 5, str(run)


@pytest.mark.attack("corruption")
def test_ranks_that_disagree_on_a_setting_raise_everywhere(tmp_path):
    # Each rank updates its own shard with its own settings: any difference is a mixed model, so
    # every rank must refuse, name the setting, and change nothing. 3 ranks: the last one differs.
    k = 3
    run = launch(k, "settings", tmp_path)
    finished(run, k)
    for case, words in (("lr", "lr"), ("betas", "betas"), ("eps", "eps"), ("weight_decay", "weight_decay"),
                        ("grad_scale", "grad_scale")):
        assert_raised_everywhere(run, k, case, "ValueError", f"group 1 {words}" if case != "grad_scale"
                                 else words, unchanged=True)
    assert outcomes(run, k, "control-step") == ["accepted"] * k
    assert_raised_everywhere(run, k, "core-groups", "ValueError", "group 0")
    assert_raised_everywhere(run, k, "core-seed", "ValueError", "seed")
    assert_raised_everywhere(run, k, "torch-sizes", "ValueError", "parameter 0 shape")
    assert_raised_everywhere(run, k, "torch-shapes", "ValueError", "parameter 0 shape")
    assert_raised_everywhere(run, k, "torch-groups", "ValueError", "group 0")
    assert_raised_everywhere(run, k, "torch-lr", "ValueError", "group 0 lr")
    assert_raised_everywhere(run, k, "torch-step-lr", "ValueError", "group 0 lr", unchanged=True)
    # The message names the ranks' values, the same text on every rank.
    assert len(set(outcomes(run, k, "lr"))) == 1 and "0.02" in outcomes(run, k, "lr")[0]


@pytest.mark.attack("corruption")
def test_flat_grads_cannot_be_replaced_or_resized(tmp_path):
    # A 64x longer flat_grads ran past the heap, a strided one gave a wrong gradient: assignment is
    # refused (write into it instead) and a tensor resized in place is refused on every rank.
    k = 2
    run = launch(k, "flat-grads", tmp_path)
    finished(run, k)
    assert_raised_everywhere(run, k, "assign", "AttributeError", "flat_grads[...] = ")
    assert_raised_everywhere(run, k, "resize", "ValueError", "flat_grads", unchanged=True)
    assert outcomes(run, k, "control-step") == ["accepted"] * k


@pytest.mark.attack("hang")
def test_unwritable_buffers_refused_on_every_rank_before_any_exchange(tmp_path):
    # Rank 2 of 3 owns no element: a refusal that only adamw_step (ranks 0 and 1) made, after the
    # reduce-scatter, left it waiting in the all-gather. A torch leaf that requires grad is
    # written as an optimizer writes (its version counter bumped); what cannot be written at
    # all is refused on every rank, before the first exchange.
    k = 3
    run = launch(k, "writable", tmp_path)
    finished(run, k)
    assert outcomes(run, k, "requires-grad-step") == ["accepted"] * k
    assert all(f"rank {r} case requires-grad-version bumped\n" in run.lines for r in range(k)), str(run)
    assert_raised_everywhere(run, k, "read-only-core", "ValueError", "flat_params is read-only")
    assert_raised_everywhere(run, k, "inference-step", "ValueError", "is an inference tensor")
    assert_raised_everywhere(run, k, "inference-load", "ValueError", "is an inference tensor")


@pytest.mark.attack("hang")
def test_constructor_error_on_one_rank_raises_everywhere(tmp_path):
    # Issue 10's check_args in both constructors already held these: kept as a regression test.
    k = 2
    run = launch(k, "ctor", tmp_path)
    finished(run, k)
    assert_raised_everywhere(run, k, "torch-lr-nan", "ValueError", "lr")
    assert_raised_everywhere(run, k, "torch-float32", "TypeError", "dtype")
    assert_raised_everywhere(run, k, "core-float32", "ValueError", "flat_params")


@pytest.mark.attack("hang")
def test_bad_seed_on_rank_0_only_raises_everywhere(tmp_path):
    # The seed was checked on rank 0 alone, after the collective check: rank 0 raised, the others
    # waited in the seed broadcast.
    k = 2
    run = launch(k, "ctor-seed", tmp_path)
    finished(run, k)
    assert_raised_everywhere(run, k, "seed-type", "TypeError", "seed")
    assert_raised_everywhere(run, k, "seed-range", "ValueError", "seed")


@pytest.mark.attack("hang")
def test_missing_gradient_on_one_rank_raises_everywhere(tmp_path):
    k = 2
    run = launch(k, "grad-none", tmp_path)
    finished(run, k)
    assert_raised_everywhere(run, k, "grad-none", "ValueError", "parameter 1", unchanged=True)
    assert_raised_everywhere(run, k, "grad-runtime-error", "RuntimeError", "RuntimeError", unchanged=True)


@pytest.mark.attack("hang")
def test_all_gather_with_n_on_some_ranks_only_raises_everywhere(tmp_path):
    # Held since issue 10 (whether n is known is part of the agreement): a regression test.
    k = 3
    run = launch(k, "all-gather-n", tmp_path)
    finished(run, k)
    assert_raised_everywhere(run, k, "n-on-rank-0", "ValueError", "all_gather called with different")
    assert_raised_everywhere(run, k, "n-on-last", "ValueError", "all_gather called with different")


@pytest.mark.attack("hang")
@pytest.mark.parametrize("how", ["exit-0", "exit-none", "keyboard"])
def test_leaving_abort_on_error_by_an_exit_aborts_the_job(how, tmp_path):
    # sys.exit(0) / sys.exit() / Ctrl-C on rank 1 inside the body: the job is over for rank 1, so
    # it aborts every rank (the others wait in a barrier) instead of exiting alone.
    run = launch(2, how, tmp_path)
    exc = "KeyboardInterrupt" if how == "keyboard" else "SystemExit"
    assert run.res.returncode != 0, str(run)
    assert f"srkern: rank 1 of 2 raised {exc}" in run.res.stderr, str(run)
    assert run.elapsed < TIMEOUT_S - 5, f"the job hung until the timeout\n{run}"
    assert "left the barrier" not in run.lines


@pytest.mark.attack("error")
def test_raw_mpi4py_communicator_is_wrapped_and_none_refused(tmp_path):
    # One process (mpi4py singleton init, no mpirun): an mpi4py communicator gives the same bits
    # as the Communicator around it; None or a string is a TypeError naming comm, raised before
    # any collective.
    pytest.importorskip("mpi4py")
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, str(WORKER), "rawcomm", str(tmp_path)], env=child_env(),
                         capture_output=True, text=True, timeout=60)
    run = Run(res, time.monotonic() - t0, tmp_path)
    finished(run, 1)
    for case in ("rs-mpi4py", "ag-mpi4py", "core-mpi4py"):
        assert f"rank 0 case {case} same\n" in run.lines, str(run)
    for case in ("rs-none", "ag-none", "core-none", "rs-str", "ag-str", "core-str"):
        assert_raised_everywhere(run, 1, case, "TypeError", "comm must be")
    for case in ("rs-out-grad", "ag-out-grad"):
        assert_raised_everywhere(run, 1, case, "ValueError", "out requires grad and grad mode is on")
    for case in ("rs-out-version", "ag-out-version"):
        assert f"rank 0 case {case} bumped\n" in run.lines, str(run)
    for case in ("sharded-step", "sharded-load"):
        assert_raised_everywhere(run, 1, case, "RuntimeError", "modified by an inplace operation")
