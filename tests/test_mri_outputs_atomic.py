"""A scan's outputs appear together or not at all (issue 13, file handling).

The rule (docs/mri.md, "Write"): all of a scan's outputs are written as hidden
temporaries, then renamed, the ``_dseg.nii.gz`` last; so a ``_dseg`` on disk means a
complete set (refused without ``--force``), and outputs without it are leftovers of an
interrupted run, replaced without ``--force``. A run replaces the scan's whole set, and
deletes the temporaries a killed run left. Ctrl-C anywhere, start-up included, is one
line and exit code 130."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest

from mri_fixtures import brain_phantom, oblique_affine, save_nifti
from psc.utils import files
from psc.utils.files import TEMP_MARK, interrupts_held, stale_temporaries, write_set
from test_mri_cli import run_segment, scan, weights  # noqa: F401  (scan, weights: fixtures)

ROOT = Path(__file__).resolve().parents[1]
STEM = "sub-01_T1w"
FULL_SET = sorted(f"{STEM}{s}" for s in ("_dseg.json", "_dseg.nii.gz", "_dseg.tsv", "_qc.png", "_volumes.tsv"))


def everything(folder: Path) -> list[str]:
    """Every name in ``folder``, hidden temporaries included."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def dead_pid() -> int:
    """The pid of a process that has exited: what a SIGKILLed run's temporaries carry."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def segment(scan, out, *extra):
    """psc-segment's arguments (run_segment adds the weights) with no brain extraction."""
    return [scan, "-o", out, "--skull-strip", "off", *extra]


# --- the generic mechanism (utils/files.write_set) -------------------------------------


def test_write_set_renames_the_marker_last_and_deletes_the_old_one_first(tmp_path, monkeypatch):
    (tmp_path / "b.txt").write_text("old marker")
    (tmp_path / "old.txt").write_text("a previous set's file")
    renamed = []
    real_replace = os.replace

    def replace(src, dst):
        renamed.append((Path(dst).name, (tmp_path / "b.txt").exists(), (tmp_path / "old.txt").exists()))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    write_set([(tmp_path / "a.txt", lambda t: Path(t).write_text("a")),
               (tmp_path / "b.txt", lambda t: Path(t).write_text("b"))], remove=[tmp_path / "old.txt"])
    # The marker (b) is gone before the first rename, so a kill mid-way leaves no marker.
    assert renamed == [("a.txt", False, False), ("b.txt", False, False)]
    assert everything(tmp_path) == ["a.txt", "b.txt"] and (tmp_path / "b.txt").read_text() == "b"


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_write_set_failing_midway_writes_nothing_and_leaves_no_temporary(tmp_path, error):
    (tmp_path / "b.txt").write_text("previous")

    def fail(tmp):
        Path(tmp).write_text("half")
        raise error("disk full" if error is OSError else None)

    with pytest.raises(error):
        write_set([(tmp_path / "a.txt", lambda t: Path(t).write_text("a")), (tmp_path / "c.txt", fail),
                   (tmp_path / "b.txt", lambda t: Path(t).write_text("b"))])
    assert everything(tmp_path) == ["b.txt"] and (tmp_path / "b.txt").read_text() == "previous"


@pytest.fixture(autouse=True)
def python_sigint_handler():
    """Python's own Ctrl-C handler, as in a terminal: a test run started in the
    background (``cmd &`` in a script, nohup) inherits SIGINT ignored, and these tests
    are about what Ctrl-C does."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_the_renames_waits_until_they_are_done():
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # Python runs its handler here: it must only take note
            finished.append(True)
    assert finished == [True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_stale_temporaries_are_those_of_dead_or_earlier_processes(tmp_path):
    target = tmp_path / "x_dseg.nii.gz"
    dead = tmp_path / f".x_dseg.nii.gz{TEMP_MARK}{dead_pid()}-abc.nii.gz"
    nested = tmp_path / f"..x_dseg.nii.gz{TEMP_MARK}{dead_pid()}-abc.nii.gz{TEMP_MARK}1-def.nii.gz"
    earlier = tmp_path / f".x_dseg.nii.gz{TEMP_MARK}{os.getpid()}-old.nii.gz"  # a container's pid 1 again
    live = tmp_path / f".x_dseg.nii.gz{TEMP_MARK}{os.getppid()}-live.nii.gz"
    mine = tmp_path / f".x_dseg.nii.gz{TEMP_MARK}{os.getpid()}-now.nii.gz"
    ancient = tmp_path / f".x_dseg.nii.gz{TEMP_MARK}{os.getppid()}-ancient.nii.gz"
    other = tmp_path / f".y_dseg.nii.gz{TEMP_MARK}{dead_pid()}-abc.nii.gz"  # another file's
    for path in (dead, nested, earlier, live, mine, ancient, other):
        path.write_bytes(b"")
    os.utime(earlier, (files.STARTED - 10, files.STARTED - 10))
    old = time.time() - files.STALE_AFTER_S - 60
    os.utime(ancient, (old, old))
    assert stale_temporaries(target) == sorted([dead, nested, earlier, ancient])


# --- the MRI policy (pipelines/mri/outputs.py through psc-segment) ---------------------


def interrupt_on_call(monkeypatch, number):
    """Make the ``number``-th NIfTI write of psc-segment's outputs raise Ctrl-C."""
    from psc.pipelines.mri import outputs

    calls = []
    real = outputs.write_nifti

    def write_nifti(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == number:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(outputs, "write_nifti", write_nifti)
    return calls


def test_ctrl_c_while_writing_leaves_nothing_and_the_rerun_needs_no_force(scan, weights, tmp_path, capsys,
                                                                          monkeypatch):
    out = tmp_path / "out"
    calls = interrupt_on_call(monkeypatch, 2)  # probseg written, then Ctrl-C on the dseg
    code, _, err = run_segment(segment(scan, out, "--probabilities"), weights, capsys)
    assert code == 130 and err == ["psc-segment: interrupted"], err
    assert len(calls) == 2 and calls[1].name.startswith(f".{STEM}_dseg.nii.gz{TEMP_MARK}")
    assert everything(out) == []  # no output, no temporary
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # main() ran in-process: untouched
    monkeypatch.undo()
    code, _, err = run_segment(segment(scan, out), weights, capsys)
    assert code == 0 and err == [], err
    assert everything(out) == FULL_SET


def test_ctrl_c_during_a_forced_rerun_keeps_the_previous_set_whole(scan, weights, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert run_segment(segment(scan, out, "--probabilities"), weights, capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    interrupt_on_call(monkeypatch, 1)
    code, _, err = run_segment(segment(scan, out, "--force"), weights, capsys)
    assert code == 130 and err == ["psc-segment: interrupted"], err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_killed_runs_leftovers_do_not_block_the_rerun_and_are_cleaned(scan, weights, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_segment(segment(scan, out, "--probabilities"), weights, capsys)[0] == 0
    # SIGKILL mid-rename: the dseg (renamed last) is missing, others are there, and the
    # temporaries of the files not yet renamed stay behind, under a pid that is gone.
    (out / f"{STEM}_dseg.nii.gz").unlink()
    pid = dead_pid()
    stale = [out / f".{STEM}_dseg.nii.gz{TEMP_MARK}{pid}-k1ll3d.nii.gz",
             out / f"..{STEM}_dseg.nii.gz{TEMP_MARK}{pid}-k1ll3d.nii.gz{TEMP_MARK}{pid}-inner.nii.gz",
             out / f".{STEM}_qc.png{TEMP_MARK}{pid}-k1ll3d.png"]
    for path in stale:
        path.write_bytes(b"half a file")
    unrelated = [out / ".hidden-notes", out / f"{STEM}_notes.txt", out / "sub-02_T1w_probseg.nii.gz",
                 out / f".other.nii.gz{TEMP_MARK}{pid}-x.nii.gz"]
    for path in unrelated:
        path.write_text("not this scan's outputs")
    code, _, err = run_segment(segment(scan, out), weights, capsys)  # no --force
    assert code == 0 and err == [], err
    # One run's set: the leftover probseg (this run wrote none) went with the temporaries.
    assert everything(out) == sorted(FULL_SET + [p.name for p in unrelated])


def test_force_replaces_the_whole_set(scan, weights, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_segment(segment(scan, out, "--probabilities"), weights, capsys)[0] == 0
    image, _ = brain_phantom()
    mask = save_nifti(out / f"{STEM}_desc-brain_mask.nii.gz", (image > 0).astype(np.uint8), oblique_affine())
    (out / "sub-02_T1w_probseg.nii.gz").write_text("another scan's")
    code, _, err = run_segment(segment(scan, out), weights, capsys)
    assert code == 1 and len(err) == 1 and "use --force" in err[0], err  # a complete set still needs it
    code, _, err = run_segment(segment(scan, out, "--force"), weights, capsys)
    assert code == 0 and err == [], err
    # The previous _probseg and brain mask are gone: this run wrote neither.
    assert everything(out) == sorted(FULL_SET + ["sub-02_T1w_probseg.nii.gz"])
    # A previous run's brain mask given back as --mask is an input, never deleted.
    save_nifti(mask, (image > 0).astype(np.uint8), oblique_affine())
    code, _, err = run_segment([scan, "-o", out, "--mask", mask, "--force"], weights, capsys)
    assert code == 0 and err == [], err
    assert mask.is_file()


# --- exit codes and Ctrl-C at start-up -------------------------------------------------


def test_exit_codes(scan, weights, tmp_path, capsys):
    """0 all segmented, 1 some inputs failed, 2 the command refused (usage included)."""
    missing = tmp_path / "nope.nii.gz"
    assert run_segment([missing, "-o", tmp_path / "a"], weights, capsys)[0] == 1  # one bad scan alone
    assert run_segment([missing, scan, "-o", tmp_path / "b"], weights, capsys)[0] == 1
    assert run_segment([scan, "-o", tmp_path / "c", "--overlap", "2"], weights, capsys)[0] == 2
    with pytest.raises(SystemExit) as usage:
        run_segment([scan, "--window", "3"], weights, capsys)
    assert usage.value.code == 2


def test_every_console_script_starts_through_the_guarded_launcher(monkeypatch):
    from psc.app import launch

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    seen = []
    monkeypatch.setattr(launch, "launch", lambda prog, module: seen.append((prog, module)) or 0)
    for name, target in scripts.items():
        module, _, function = target.partition(":")
        assert module == "psc.app.launch", (name, target)
        getattr(launch, function)()
        prog, command = seen[-1]
        source = (ROOT / "app" / f"{command.rsplit('.', 1)[1]}.py").read_text()
        assert prog == name and re.search(rf'^PROG = "{name}"$', source, re.M), (name, command)


def mapped(pid: int, library: str) -> bool:
    try:
        return library in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="watches /proc/PID/maps (Linux)")
@pytest.mark.parametrize("library, after", [("_multiarray_umath", 0.0), ("libtorch_cpu", 0.0),
                                            ("libtorch_cpu", 1.0)])
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(library, after, scan, weights, tmp_path):
    """SIGINT while the console script still imports numpy, torch (and then monai, or
    loads the weights): no traceback, exit code 130 (not -2)."""
    command = Path(sys.executable).with_name("psc-segment")
    if not command.exists():
        pytest.skip("psc-segment is not installed (pip install -e .)")
    child = subprocess.Popen([str(command), str(scan), "--weights", str(weights), "-o", str(tmp_path / "out")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             # Ctrl-C reaches the child even if this pytest runs with SIGINT ignored.
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not mapped(child.pid, library) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert child.poll() is None, "psc-segment ended before it was interrupted"
        time.sleep(after)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
        child.wait()
    assert "Traceback" not in err, err
    assert child.returncode == 130, (child.returncode, err)
    assert err.strip().splitlines()[-1] == "psc-segment: interrupted", err
    assert not any(TEMP_MARK in name for name in everything(tmp_path / "out"))
