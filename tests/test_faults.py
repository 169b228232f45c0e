"""Faults a user meets: nothing they own is lost, nothing half-written or orphaned stays
behind, and every error is one sentence that names the file.

Kills and interruptions use real processes and real signals; a barrier
(``tests/fault_hooks.py``) holds a process inside the step under test, so no test
depends on timing luck.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_nuclei

from s2l_core.cli import main
from s2l_core.config import TrainConfig
from s2l_core.data import DataError, PreparedDataset, fetch_archive
from s2l_core.files import read_json, remove_stale, write_image
from s2l_core.scribbles import ScribbleSet, synthesize_scribbles
from s2l_core.train import Trainer

TESTS = Path(__file__).resolve().parent
HOOKED = "import fault_hooks; fault_hooks.main()"
#: Steps a test holds a process in: preparing one image, reading one image to predict.
PREPARE, READ = "s2l_core.data:_prepare_one", "s2l_core.predict:read_image"
TINY = {"epochs": 1, "batch_size": 2, "model": {"base_channels": 4, "depth": 2}}


def _env(**extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(TESTS), PYTHONUNBUFFERED="1", **extra)
    env.pop("COLUMNS", None)
    return env


def _s2l(*args: str) -> list[str]:
    return [sys.executable, "-m", "s2l_core.cli", *args]


def _interruptible() -> None:
    """Ctrl-C as a terminal delivers it: a shell without job control starts background
    jobs with SIGINT ignored, and that would be inherited by the processes under test
    (a CI run started with ``&``)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(command: list[str], log: Path, **kwargs) -> subprocess.Popen:
    """Start a process in its own session, stdout and stderr into ``log``, with SIGINT
    at its default disposition (:func:`_interruptible`)."""
    handle = open(log, "wb")  # the child holds it; closed when it ends
    kwargs.setdefault("env", _env())
    kwargs.setdefault("preexec_fn", _interruptible)
    return subprocess.Popen(
        command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
    )


def _wait_for(condition, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"process ended early ({process.returncode}):\n{log.read_text()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out; output so far:\n{log.read_text()}")
        time.sleep(0.05)


def _held_at(pause: str, args: list[str], folder: Path, count: int = 1, after: int = 0):
    """Start ``s2l ARGS`` with the function ``pause`` held at a barrier in ``folder``
    (from its call ``after + 1`` on); return once ``count`` processes wait there:
    ``(process, log, their ids, barrier)``."""
    barrier, log = folder / "barrier", folder / "held.log"
    barrier.mkdir()
    env = _env(S2L_PAUSE=pause, S2L_BARRIER=str(barrier), S2L_PAUSE_AFTER=str(after))
    run = _start([sys.executable, "-c", HOOKED, *args], log, env=env)
    _wait_for(lambda: len(list(barrier.glob("started-*"))) >= count, run, log)
    return run, log, [int(p.name.split("-")[1]) for p in barrier.glob("started-*")], barrier


def _gone(pid: int) -> bool:
    """True once ``pid`` has ended (a zombie nobody reaps counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _temporaries(folder: Path) -> list[str]:
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob(".*")
        if ".tmp" in p.name or p.name.endswith(".old")
    )


def _one_error_line(err: str, *expected: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("s2l ")]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def checkpoint(synthetic_samples, tmp_path) -> Path:
    trainer = Trainer(synthetic_samples(2), TrainConfig(**TINY), device="cpu", verbose=False)
    trainer.fit(progress=False)
    return trainer.export(tmp_path / "model.pt")


def _images(folder: Path, names=("a.png", "b.png")) -> Path:
    for k, name in enumerate(names):
        rgb, _ = synthetic_nuclei(k, (48, 56))
        write_image(folder / name, rgb[..., 0]) if name.endswith((".png", ".tif")) else None
        if name.endswith(".jpg"):
            from PIL import Image

            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rgb).save(folder / name)
    return folder


def _digests(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- 1. overwrite


def test_predict_into_its_input_folder_is_refused(checkpoint, tmp_path, capsys):
    images = _images(tmp_path / "imgs")
    before = _digests(images)
    status = main(["predict", str(checkpoint), str(images), str(images), "--overwrite", "--quiet"])
    _one_error_line(capsys.readouterr().err, "is the input folder", "choose another output")
    assert status == 2 and _digests(images) == before


def test_overwrite_replaces_only_what_predict_wrote(checkpoint, tmp_path, capsys):
    parent = tmp_path / "parent"
    images = _images(parent / "imgs")
    (parent / "notes.txt").write_text("mine")
    (parent / "sub").mkdir()
    (parent / "sub" / "keep.txt").write_text("mine too")
    base = ["predict", str(checkpoint), str(images), str(parent), "--quiet", "--device", "cpu"]
    # Without --overwrite a folder that holds anything is refused, naming the option.
    assert main(base) == 2
    _one_error_line(capsys.readouterr().err, "is not empty", "--overwrite")
    inputs = _digests(images)
    # The output folder is the input's parent: the labels go beside the input folder.
    assert main([*base, "--overwrite"]) == 0
    assert _digests(images) == inputs
    assert (parent / "notes.txt").read_text() == "mine"
    assert (parent / "sub" / "keep.txt").read_text() == "mine too"
    record = read_json(parent / "s2l_predict.json")
    assert record["outputs"] == ["a.png", "b.png"] and record["complete"] is True
    # Again: the labels the first run wrote are replaced, nothing else.
    (parent / "a.png").write_bytes(b"stale")
    assert main([*base, "--overwrite"]) == 0
    assert (parent / "a.png").read_bytes() != b"stale"
    assert (parent / "notes.txt").read_text() == "mine" and _digests(images) == inputs
    assert _temporaries(parent) == []
    # A file of an output's name that predict did not write is never replaced.
    other = tmp_path / "other"
    _images(other, ("a.png",))
    mine = (other / "a.png").read_bytes()
    out = ["predict", str(checkpoint), str(images), str(other), "--overwrite", "--quiet"]
    assert main(out) == 2
    _one_error_line(capsys.readouterr().err, "a.png", "no earlier s2l predict or label export")
    assert (other / "a.png").read_bytes() == mine and not (other / "b.png").exists()


def test_outputs_that_would_share_a_name_are_refused_first(checkpoint, tmp_path, capsys):
    images = _images(tmp_path / "in", ("a.png", "a.tif", "a.jpg"))
    out = tmp_path / "out"
    assert main(["predict", str(checkpoint), str(images), str(out), "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "written twice", "a.tif (from a.jpg and a.tif)")
    assert not out.exists()
    probs = _images(tmp_path / "probs", ("x.png", "x_prob.tif"))
    command = ["predict", str(checkpoint), str(probs), str(out), "--probability", "--quiet"]
    assert main(command) == 2
    _one_error_line(capsys.readouterr().err, "x_prob.tif (from x.png and x_prob.tif)")
    assert not out.exists()


# --------------------------------------------------------------------------- 2. concurrency


def _prepare_args(archive: Path, cache: Path) -> list[str]:
    return [
        "prepare", "--source", str(archive), "--cache-dir", str(cache), "--quiet",
        "--ratios", "0.3", "0.5",
    ]  # fmt: skip


def _complete(cache: Path, n: int) -> None:
    dataset = PreparedDataset(cache / "bbbc038")
    assert len(dataset) == n and dataset.missing_files() == []
    scribble_set = ScribbleSet(dataset, 0)
    assert scribble_set.missing_files() == [] and scribble_set.ratios == (0.3, 0.5)
    for ratio in ("r030", "r050"):
        assert len(list((dataset.root / "scribbles" / "seed0" / ratio).glob("*.png"))) == n


def test_two_prepare_runs_on_one_cache_take_turns(make_archive, tmp_path):
    archive, cache = make_archive(n_images=6), tmp_path / "cache"
    args = _prepare_args(archive, cache)
    # The first run, with one worker, is inside its preparation of the images...
    first, log1, _, barrier = _held_at(PREPARE, [*args, "--workers", "1"], tmp_path)
    log2 = tmp_path / "second.log"
    second = _start(_s2l(*args, "--workers", "2"), log2)
    # ...and the second, with two workers, waits for it instead of preparing beside it.
    _wait_for(lambda: "waiting for another process" in log2.read_text(), second, log2)
    (barrier / "go").touch()
    assert first.wait(120) == 0, log1.read_text()
    assert second.wait(120) == 0, log2.read_text()
    _complete(cache, 6)
    assert _temporaries(cache) == []


def test_an_incomplete_cache_is_prepared_again(make_archive, tmp_path, capsys):
    archive, cache = make_archive(n_images=4), tmp_path / "cache"
    assert main([*_prepare_args(archive, cache), "--workers", "1"]) == 0
    root = cache / "bbbc038"
    (root / "scribbles" / "seed0" / "r050" / "img01.png").unlink()
    capsys.readouterr()
    assert main([*_prepare_args(archive, cache), "--workers", "1"]) == 0
    assert "lacks 1 scribble files" in capsys.readouterr().err
    _complete(cache, 4)
    (root / "labels" / "img02.png").unlink()
    assert main([*_prepare_args(archive, cache), "--workers", "1"]) == 0
    assert "lacks 1 of its 8 files" in capsys.readouterr().err
    _complete(cache, 4)


# --------------------------------------------------------------------------- 4, 5. kills


def test_killed_prepare_takes_its_workers_along(make_archive, tmp_path):
    archive, cache = make_archive(n_images=8), tmp_path / "cache"
    args = [*_prepare_args(archive, cache), "--workers", "2"]
    run, _, workers, _ = _held_at(PREPARE, args, tmp_path, count=2)
    assert run.pid not in workers
    run.send_signal(signal.SIGKILL)
    run.wait(30)
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(pid) for pid in workers), "a worker outlived its killed parent"
    assert [p.name for p in cache.glob(".bbbc038.*.tmp")]  # the killed run's temporary
    # A later run removes it, as the process that made it is gone.
    assert main([*_prepare_args(archive, cache), "--workers", "1"]) == 0
    assert _temporaries(cache) == []
    _complete(cache, 8)


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path, synthetic_samples):
    # A temporary whose process was killed outright while writing it...
    state = tmp_path / "m.state.pt"
    code = (
        "import os, signal\nfrom s2l_core.files import atomic_path\n"
        f"with atomic_path({str(state)!r}) as tmp:\n"
        "    tmp.write_bytes(b'partial')\n    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], env=_env()).returncode == -9
    (left,) = [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.state.pt.")]
    # ...beside ones that are not temporaries of this package, and one of a live process.
    live = tmp_path / f".m.state.pt.{os.getpid()}-live.tmp.pt"
    keep = [tmp_path / ".m.state.pt.notes", tmp_path / "m.state.pt.1-x.tmp", live]
    for path in keep:
        path.write_text("x")
    trainer = Trainer(synthetic_samples(2), TrainConfig(**TINY), device="cpu", verbose=False)
    trainer.save(state)
    names = {p.name for p in tmp_path.iterdir()}
    assert left not in names and {p.name for p in keep} <= names and state.is_file()
    assert remove_stale(state) == []  # a live process's temporary stays


def test_temporaries_without_a_process_id_are_removed_under_the_lock(make_archive, tmp_path):
    """Names without a process id (as earlier versions made them) are removed when the
    run holds the cache's lock and they are older than it; newer ones are left alone."""
    archive, cache = make_archive(n_images=2), tmp_path / "cache"
    cache.mkdir()
    old = [cache / ".bbbc038.k3j9x1qa.tmp", cache / ".stage1_train.zip.u8w2e0rt.tmp.zip"]
    old[0].mkdir()
    (old[0] / "img00.png").write_bytes(b"half")
    old[1].write_bytes(b"half an archive")
    for path in old:
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    newer = cache / ".stage1_train.zip.n3w3rf1l.tmp.zip"
    newer.write_bytes(b"x")
    os.utime(newer, (time.time() + 3600, time.time() + 3600))  # not older than this run
    assert main([*_prepare_args(archive, cache), "--workers", "1"]) == 0
    assert not any(path.exists() for path in old) and newer.exists()
    _complete(cache, 2)


def _unfinished(folder: Path, name: str = "out") -> list[Path]:
    return sorted(folder.glob(f".{name}.unfinished.*"))


def test_killed_predict_leaves_nothing_that_looks_finished(checkpoint, tmp_path):
    images, out = _images(tmp_path / "in"), tmp_path / "out"
    args = ["predict", str(checkpoint), str(images), str(out), "--quiet", "--device", "cpu"]
    run, *_ = _held_at(READ, args, tmp_path)
    run.send_signal(signal.SIGKILL)
    run.wait(30)
    # Killed at the first image: no output folder; the folder of finished images,
    # named after the killed process, holds only its record.
    (kept,) = _unfinished(tmp_path)
    assert not out.exists() and kept.name == f".out.unfinished.{run.pid}"
    assert [p.name for p in kept.iterdir()] == [".s2l-unfinished.json"]
    assert main([*args[:3], str(out), "--quiet", "--device", "cpu"]) == 0
    assert _temporaries(tmp_path) == [] and (out / "s2l_predict.json").is_file()
    assert _unfinished(tmp_path) == [] and sorted(p.name for p in out.iterdir()) == [
        "a.png", "b.png", "s2l_predict.json"
    ]  # fmt: skip


def _count_predictions(monkeypatch) -> list[str]:
    """The names of the images that ``predict_folder`` reads from now on, in order."""
    import s2l_core.predict as predict

    calls, real = [], predict.read_image
    monkeypatch.setattr(
        predict, "read_image", lambda path: calls.append(Path(path).name) or real(path)
    )
    return calls


def test_a_killed_predict_goes_on_where_it_stopped(checkpoint, tmp_path, monkeypatch, capsys):
    images, out = _images(tmp_path / "in", ("a.png", "b.png", "c.png")), tmp_path / "out"
    args = ["predict", str(checkpoint), str(images), str(out), "--quiet", "--device", "cpu"]
    reference = tmp_path / "reference"
    assert main([*args[:3], str(reference), "--quiet", "--device", "cpu"]) == 0
    run, *_ = _held_at(READ, args, tmp_path, after=1)  # a.png done, held at b.png
    run.send_signal(signal.SIGKILL)
    run.wait(30)
    (kept,) = _unfinished(tmp_path)
    assert not out.exists() and sorted(p.name for p in kept.iterdir()) == [
        ".s2l-unfinished.json", "a.png"
    ]  # fmt: skip
    calls = _count_predictions(monkeypatch)
    assert main(args) == 0
    assert calls == ["b.png", "c.png"]  # a.png is not predicted again
    assert "going on from a run that stopped: 1 of 3 images were done" in capsys.readouterr().err
    assert _digests(out) == _digests(reference) | {
        "s2l_predict.json": _digests(out)["s2l_predict.json"]
    }
    assert _unfinished(tmp_path) == [] and _temporaries(tmp_path) == []


def test_a_stopped_predict_goes_on_after_its_output_folder_was_made_by_hand(
    checkpoint, tmp_path, monkeypatch
):
    """The finished images of a run into a new folder wait beside it; if the folder is
    made (empty) before the next run, that run still finds them and takes them over."""
    images, out = _images(tmp_path / "in", ("a.png", "b.png", "c.png")), tmp_path / "out"
    args = ["predict", str(checkpoint), str(images), str(out), "--quiet", "--device", "cpu"]
    run, *_ = _held_at(READ, args, tmp_path, after=1)  # a.png done, held at b.png
    run.send_signal(signal.SIGKILL)
    run.wait(30)
    (kept,) = _unfinished(tmp_path)
    a = (kept / "a.png").read_bytes()
    out.mkdir()
    calls = _count_predictions(monkeypatch)
    assert main(args) == 0
    assert calls == ["b.png", "c.png"] and (out / "a.png").read_bytes() == a
    assert _unfinished(tmp_path) == [] and _unfinished(out, "s2l_predict.json") == []
    assert sorted(p.name for p in out.iterdir()) == [
        "a.png", "b.png", "c.png", "s2l_predict.json"
    ]  # fmt: skip


def test_a_stopped_overwrite_keeps_the_earlier_results_until_it_is_done(
    checkpoint, tmp_path, monkeypatch
):
    """Into an existing folder (--overwrite) the finished images wait inside it, hidden,
    and the earlier run's files stay as they were until every image is done."""
    images, out = _images(tmp_path / "in", ("a.png", "b.png", "c.png")), tmp_path / "out"
    args = ["predict", str(checkpoint), str(images), str(out), "--quiet", "--device", "cpu"]
    assert main([*args, "--threshold", "0.7"]) == 0
    before = _digests(out)
    run, *_ = _held_at(READ, [*args, "--overwrite"], tmp_path, after=1)
    run.send_signal(signal.SIGKILL)
    run.wait(30)
    (kept,) = _unfinished(out, "s2l_predict.json")
    assert (kept / "a.png").is_file() and _digests(out) == {
        **before,
        **{str(p.relative_to(out)): p.read_bytes() for p in kept.iterdir()},
    }  # the earlier results, and the hidden folder of this run's
    calls = _count_predictions(monkeypatch)
    assert main([*args, "--overwrite"]) == 0
    assert calls == ["b.png", "c.png"] and _unfinished(out, "s2l_predict.json") == []
    assert read_json(out / "s2l_predict.json")["preset"]["threshold"] != 0.7
    assert sorted(p.name for p in out.iterdir()) == sorted(before)


def test_what_a_stopped_predict_kept_is_used_only_where_it_holds(checkpoint, tmp_path, monkeypatch):
    """An input changed since is predicted again; other settings start afresh and delete
    what was kept; a folder of that name that is not the package's is left alone."""
    images, out = _images(tmp_path / "in", ("a.png", "b.png", "c.png")), tmp_path / "out"
    args = ["predict", str(checkpoint), str(images), str(out), "--quiet", "--device", "cpu"]
    run, *_ = _held_at(READ, args, tmp_path, after=2)  # a.png and b.png done
    run.send_signal(signal.SIGKILL)
    run.wait(30)
    (kept,) = _unfinished(tmp_path)
    assert {"a.png", "b.png"} <= {p.name for p in kept.iterdir()}
    write_image(images / "b.png", np.zeros((48, 56), np.uint8))  # changed since
    calls = _count_predictions(monkeypatch)
    assert main(args) == 0
    assert calls == ["b.png", "c.png"]  # a.png is kept; b.png changed since
    # Other settings: nothing kept is used (and the kept folder goes).
    shutil.rmtree(out)
    shutil.rmtree(tmp_path / "barrier")
    run, *_ = _held_at(READ, args, tmp_path, after=2)
    run.send_signal(signal.SIGKILL)
    run.wait(30)
    calls.clear()
    assert main([*args, "--threshold", "0.7"]) == 0
    assert calls == ["a.png", "b.png", "c.png"] and _unfinished(tmp_path) == []
    # A folder of that name with files but no record is not this package's: refused,
    # and left as it is.
    foreign = tmp_path / ".new.unfinished.999999"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("not a result")
    assert main([*args[:3], str(tmp_path / "new"), "--quiet", "--device", "cpu"]) == 1
    assert (foreign / "mine.txt").read_text() == "not a result"
    assert not (tmp_path / "new").exists()


def test_a_second_predict_into_the_same_folder_is_refused(checkpoint, tmp_path, capsys):
    images, out = _images(tmp_path / "in"), tmp_path / "out"
    args = ["predict", str(checkpoint), str(images), str(out), "--quiet", "--device", "cpu"]
    run, log, _, barrier = _held_at(READ, args, tmp_path)
    assert main(args) == 1
    line = _one_error_line(capsys.readouterr().err, str(out), f"another process (id {run.pid})")
    assert "choose another output folder" in line
    (barrier / "go").touch()
    assert run.wait(60) == 0, log.read_text()
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "s2l_predict.json"]


def test_a_folder_made_meanwhile_is_never_replaced(checkpoint, tmp_path):
    """The output folder was absent when predict began; the user makes it, with a file,
    while predict runs: predict ends with an error instead of replacing it."""
    images, out = _images(tmp_path / "in"), tmp_path / "out"
    args = ["predict", str(checkpoint), str(images), str(out), "--quiet", "--device", "cpu"]
    run, log, _, barrier = _held_at(READ, args, tmp_path)
    out.mkdir()
    (out / "mine.txt").write_text("made meanwhile")
    (barrier / "go").touch()
    assert run.wait(60) == 1
    _one_error_line(log.read_text(), str(out), "appeared while the results were made")
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    assert _temporaries(tmp_path) == []


# --------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_during_prepare(make_archive, tmp_path):
    archive, cache = make_archive(n_images=8), tmp_path / "cache"
    run, log, workers, _ = _held_at(PREPARE, _prepare_args(archive, cache), tmp_path, count=2)
    os.killpg(run.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
    assert run.wait(60) == 1
    _one_error_line(log.read_text(), "s2l prepare: interrupted", "run the command again")
    assert all(_gone(pid) for pid in workers)
    assert _temporaries(cache) == [] and not (cache / "bbbc038").exists()


def test_ctrl_c_during_predict(checkpoint, tmp_path):
    images, out = _images(tmp_path / "in"), tmp_path / "out"
    args = ["predict", str(checkpoint), str(images), str(out), "--quiet", "--device", "cpu"]
    run, log, _, _ = _held_at(READ, args, tmp_path)
    os.killpg(run.pid, signal.SIGINT)
    assert run.wait(60) == 1
    _one_error_line(log.read_text(), "s2l predict: interrupted", "nothing was written")
    # No image was done: nothing is kept.
    assert not out.exists() and _temporaries(tmp_path) == [] and _unfinished(tmp_path) == []


def test_ctrl_c_during_predict_keeps_the_images_done(checkpoint, tmp_path):
    images, out = _images(tmp_path / "in"), tmp_path / "out"
    args = ["predict", str(checkpoint), str(images), str(out), "--quiet", "--device", "cpu"]
    run, log, _, _ = _held_at(READ, args, tmp_path, after=1)
    os.killpg(run.pid, signal.SIGINT)
    assert run.wait(60) == 1
    err = log.read_text()
    _one_error_line(err, "s2l predict: interrupted", "the same command goes on from there")
    (kept,) = _unfinished(tmp_path)
    assert f"1 of 2 images are done and kept in {kept}" in err
    assert not out.exists() and (kept / "a.png").is_file() and _temporaries(tmp_path) == []
    assert main(args) == 0 and _unfinished(tmp_path) == []


def _own_training_set(folder: Path, n: int = 2, blank: bool = False, only_fg: bool = False):
    images, scribbles = folder / "images", folder / "scribbles"
    for k in range(n):
        rgb, labels = synthetic_nuclei(k, (64, 64))
        write_image(images / f"c{k}.png", rgb)
        scribble = synthesize_scribbles(labels, 0.5, seed=k).scribble
        if blank:
            scribble = np.full_like(scribble, 250)
        if only_fg:
            scribble = np.where(scribble == 1, 1, 250).astype(np.uint8)
        write_image(scribbles / f"c{k}.png", scribble)
    return images, scribbles


def test_ctrl_c_during_training_then_resume(tmp_path):
    images, scribbles = _own_training_set(tmp_path)
    out = tmp_path / "runs" / "m.pt"
    args = ["train", "--images", str(images), "--scribbles", str(scribbles), "--out", str(out)]
    args += ["--profile", "smoke", "--epochs", "1000", "--device", "cpu", "--quiet"]
    log = tmp_path / "train.log"
    run = _start(_s2l(*args), log)
    state = out.with_name("m.state.pt")
    _wait_for(state.is_file, run, log)  # at least one epoch is saved
    os.killpg(run.pid, signal.SIGINT)
    assert run.wait(60) == 1
    _one_error_line(log.read_text(), "s2l train: interrupted", str(state), "--resume")
    assert not out.exists() and _temporaries(tmp_path) == []
    epoch = torch.load(state, weights_only=True)["epoch"]
    assert epoch >= 1
    resumed = subprocess.run(
        _s2l(*args[:-5], "--epochs", str(epoch + 1), "--device", "cpu", "--quiet", "--resume"),
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {state} at epoch {epoch}" in resumed.stdout and out.is_file()


# --------------------------------------------------------------------------- 6. one sentence


def _without_override():
    """``preexec_fn`` under which root, too, obeys permission bits (it drops the
    capabilities that let root write anywhere), else None."""
    if os.geteuid() != 0:
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def drop() -> None:
        for capability in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
            if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
                raise OSError(ctypes.get_errno(), "cannot drop a capability")

    return drop


def test_read_only_folders_are_named_before_any_work(checkpoint, tmp_path):
    images = _images(tmp_path / "in")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    cases = [
        ["predict", str(checkpoint), str(images), str(locked / "out")],
        ["predict", str(checkpoint), str(images), str(locked), "--overwrite"],
        ["prepare", "--cache-dir", str(locked), "--source", str(checkpoint)],
        [
            "train",
            "--images",
            str(images),
            "--scribbles",
            str(images),
            "--out",
            str(locked / "m.pt"),
        ],
    ]
    try:
        for args in cases:
            done = subprocess.run(
                _s2l(*args, "--quiet"), env=_env(), capture_output=True, text=True,
                preexec_fn=_without_override(), timeout=120,
            )  # fmt: skip
            assert done.returncode == 1, (args, done.stderr)
            _one_error_line(done.stderr, str(locked), "Permission denied", "check the permissions")
            assert "Using the CPU" not in done.stdout  # refused before the model was built
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_a_full_disk_is_one_sentence_and_leaves_nothing(checkpoint, tmp_path, capsys, monkeypatch):
    import s2l_core.predict as predict

    images = _images(tmp_path / "in")
    real, calls = predict.save_labels, []

    def full_disk(path, labels):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, labels)

    monkeypatch.setattr(predict, "save_labels", full_disk)
    out = tmp_path / "out"
    assert main(["predict", str(checkpoint), str(images), str(out), "--quiet"]) == 1
    _one_error_line(capsys.readouterr().err, "No space left on device", "free some space")
    assert not out.exists() and _temporaries(tmp_path) == []


def test_wrong_kinds_of_path(checkpoint, tmp_path, capsys):
    images = _images(tmp_path / "in")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert main(["predict", str(checkpoint), str(images), str(a_file), "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, str(a_file), "is a file, not a folder")
    assert main(["predict", str(tmp_path), str(images), str(tmp_path / "o"), "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "is a folder, not a checkpoint file")
    # --out a folder: refused before any image is read or any epoch trained.
    train = ["train", "--images", str(images), "--scribbles", str(images), "--quiet"]
    assert main([*train, "--out", str(tmp_path)]) == 2
    _one_error_line(capsys.readouterr().err, "--out", "is a folder", "s2l.pt")
    # A bound on --scale, said by the argument parser.
    with pytest.raises(SystemExit) as stop:
        main(["predict", str(checkpoint), str(images), str(tmp_path / "o"), "--scale", "1e9"])
    assert stop.value.code == 2
    assert "scale must be a number from 0.0625 to 16" in capsys.readouterr().err


def test_malformed_and_hostile_checkpoints(checkpoint, tmp_path, capsys, monkeypatch):
    images = _images(tmp_path / "in")
    good = torch.load(checkpoint, weights_only=True)

    class Hostile:
        def __reduce__(self):
            return (os.getcwd, ())

    cases = {
        "config5.pt": ({**good, "model_config": 5}, "its model_config is int"),
        "nomodel.pt": ({k: v for k, v in good.items() if k != "model"}, "no network weights"),
        "smp.pt": (
            {**good, "model_config": {"arch": "smp_unet"}},
            "needs the optional package 'segmentation_models_pytorch'",
        ),
        "hostile.pt": ({**good, "extra": Hostile()}, "is not a plain checkpoint"),
    }
    monkeypatch.setitem(sys.modules, "segmentation_models_pytorch", None)  # not installed
    for name, (state, message) in cases.items():
        torch.save(state, tmp_path / name)
        out = tmp_path / f"out_{name}"
        assert main(["predict", str(tmp_path / name), str(images), str(out), "--quiet"]) == 2
        line = _one_error_line(capsys.readouterr().err, name, message)
        assert "weights_only" not in line and not out.exists()
    data = checkpoint.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    assert main(["predict", str(tmp_path / "cut.pt"), str(images), str(tmp_path / "o")]) == 2
    _one_error_line(capsys.readouterr().err, "cut.pt is not a readable checkpoint")


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds none."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_an_image_that_declares_too_many_pixels_is_named(checkpoint, tmp_path, capsys):
    images = _images(tmp_path / "in", ("a.png",))
    (images / "huge.png").write_bytes(_png_header(20_000, 20_000))
    out = tmp_path / "out"
    assert main(["predict", str(checkpoint), str(images), str(out), "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "huge.png declares more pixels", "tiles")
    assert not out.exists()


# --------------------------------------------------------------------------- 7. messages


def test_archive_errors_name_the_source_and_a_changed_cache_is_caught(make_archive, tmp_path):
    archive = make_archive(n_images=2)
    cut = tmp_path / "cut.zip"
    cut.write_bytes(archive.read_bytes()[:-200])
    cache = tmp_path / "cache"
    with pytest.raises(DataError) as failure:
        fetch_archive(cut, cache, progress=False)
    assert f"the archive from {cut}" in str(failure.value) and ".tmp" not in str(failure.value)
    assert _temporaries(tmp_path) == []
    cached = fetch_archive(archive, cache, progress=False)
    cached.write_bytes(bytes(cached.stat().st_size))  # zeros, same size
    with pytest.raises(DataError, match=r"has changed since it was fetched.*--force"):
        fetch_archive(archive, cache, progress=False)
    assert fetch_archive(archive, cache, progress=False, force=True).read_bytes() == (
        archive.read_bytes()
    )


# --------------------------------------------------------------------------- 8. training


def test_training_that_cannot_learn_is_refused(tmp_path, capsys):
    for kind, message in (("blank", "leaves all pixels unlabelled"), ("only_fg", "no background")):
        images, scribbles = _own_training_set(tmp_path / kind, **{kind: True})
        out = tmp_path / kind / "m.pt"
        args = ["train", "--images", str(images), "--scribbles", str(scribbles)]
        assert main([*args, "--out", str(out), "--quiet", "--device", "cpu"]) == 2
        _one_error_line(capsys.readouterr().err, message)
        assert not out.exists() and not out.with_name("m.state.pt").exists()


def test_training_lists_skipped_images_and_never_replaces_a_run(tmp_path, capsys):
    images, scribbles = _own_training_set(tmp_path, n=3)
    (scribbles / "c2.png").unlink()
    out = tmp_path / "m.pt"
    args = ["train", "--images", str(images), "--scribbles", str(scribbles), "--out", str(out)]
    args += ["--profile", "smoke", "--epochs", "1", "--device", "cpu", "--quiet"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "skipped 1 image(s) that have no scribble file" in err and "c2.png" in err
    # A second run to the same --out is refused rather than replacing the first.
    assert main(args) == 2
    _one_error_line(capsys.readouterr().err, "m.state.pt exists", "--resume")
    # --resume with other settings keeps the saved ones and says so.
    assert main([*args, "--resume", "--batch-size", "3", "--epochs", "2"]) == 0
    err = capsys.readouterr().err
    assert "these options differ and are not used: batch_size 3 (kept: " in err
    assert torch.load(out.with_name("m.state.pt"), weights_only=True)["epoch"] == 2


# --------------------------------------------------------------------------- 9. umask


def test_created_folders_follow_the_umask(make_archive, checkpoint, tmp_path):
    archive, cache = make_archive(n_images=2), tmp_path / "cache"
    images = _images(tmp_path / "in")
    existing = tmp_path / "existing"
    existing.mkdir()
    existing.chmod(0o755)

    def umask() -> None:
        os.umask(0o027)

    for args in (
        [*_prepare_args(archive, cache), "--workers", "1"],
        ["predict", str(checkpoint), str(images), str(tmp_path / "new"), "--quiet"],
        ["predict", str(checkpoint), str(images), str(existing), "--quiet"],
    ):
        done = subprocess.run(_s2l(*args), env=_env(), preexec_fn=umask, capture_output=True)
        assert done.returncode == 0, done.stderr
    for folder in (
        cache / "bbbc038", cache / "bbbc038" / "labels", cache / "bbbc038" / "scribbles" / "seed0",
        cache / "stage1_train", tmp_path / "new",
    ):  # fmt: skip
        assert folder.stat().st_mode & 0o777 == 0o750, folder
    assert (tmp_path / "new" / "a.png").stat().st_mode & 0o777 == 0o640
    assert existing.stat().st_mode & 0o777 == 0o755  # kept, not replaced by a private one
