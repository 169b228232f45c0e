"""Several processes (torchrun, gloo on the CPU): training and prediction shared, one
failure stopping all, and the helpers of s2l_core.distributed alone.

Each launch starts two processes with ``python -m torch.distributed.run`` on a free port
of this machine and is bounded by :data:`LAUNCH_TIMEOUT`; the processes give up on each
other after ``S2L_DIST_TIMEOUT`` = 30 s.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import synthetic_nuclei
from distributed_worker import TINY, tiny_samples
from test_cli import _own_images

from s2l_core import distributed
from s2l_core.checkpoint import load_checkpoint
from s2l_core.cli import main
from s2l_core.config import PROFILES
from s2l_core.files import read_image, read_json, write_image
from s2l_core.train import Trainer

WORKER = Path(__file__).with_name("distributed_worker.py")
#: The most one launch may take (they take about 5 to 10 s on 2 cores).
LAUNCH_TIMEOUT = 120


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the worker in two processes; kill them all if they outlast the bound."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER), *args,
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "S2L_DIST_TIMEOUT": "30", **(env or {})}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = process.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"the two processes ran past {LAUNCH_TIMEOUT} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def _ok(run: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert run.returncode == 0, run.stderr[-4000:]
    return run


@pytest.fixture
def tiny_profile(monkeypatch):
    """The ``smoke`` profile of ``s2l train`` is the worker's tiny network here too."""
    monkeypatch.setitem(PROFILES, "smoke", TINY)


# ----------------------------------------------------------------------------- alone


def test_launch_variables_of_torchrun_and_slurm_are_read():
    torchrun_env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                    "MASTER_PORT": "29500"}  # fmt: skip
    assert distributed.detect(torchrun_env) == distributed.Launch(3, 4, 1, "torchrun")
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
             "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}  # fmt: skip
    assert distributed.detect(slurm) == distributed.Launch(5, 8, 1, "slurm")
    # srun without a meeting point is not a launch: one s2l command in a SLURM job.
    lonely = {k: v for k, v in slurm.items() if not k.startswith("MASTER")}
    assert distributed.detect(lonely) is None
    assert distributed.detect({}) is None
    one = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    assert distributed.detect(one) == distributed.Launch(0, 1, 0, "torchrun")
    for bad, message in (
        ({**torchrun_env, "RANK": "4"}, "RANK=4 is not below WORLD_SIZE=4"),
        ({**torchrun_env, "RANK": "x"}, "RANK must be a whole number, got 'x'"),
        ({k: v for k, v in torchrun_env.items() if k != "LOCAL_RANK"}, "LOCAL_RANK is not set"),
        ({k: v for k, v in torchrun_env.items() if k != "MASTER_PORT"}, "MASTER_PORT not set"),
        ({**slurm, "SLURM_NTASKS": "0"}, "SLURM_NTASKS must be at least 1"),
    ):
        with pytest.raises(ValueError, match=message):
            distributed.detect(bad)
    assert distributed.timeout_seconds({}) == distributed.DEFAULT_TIMEOUT_S
    assert distributed.timeout_seconds({"S2L_DIST_TIMEOUT": "12.5"}) == 12.5
    for bad in ("0", "-1", "soon", "inf"):
        with pytest.raises(ValueError, match="S2L_DIST_TIMEOUT must be a positive number"):
            distributed.timeout_seconds({"S2L_DIST_TIMEOUT": bad})
    assert distributed.backend_for("cpu") == "gloo"
    assert distributed.backend_for("cuda") == "nccl"


def test_alone_the_helpers_do_nothing(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.setup("cpu") is False and not distributed.is_distributed()
    assert (distributed.rank(), distributed.world_size(), distributed.local_rank()) == (0, 1, 0)
    assert distributed.is_main() and distributed.process_label() == ""
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object([2]) == [2]
    assert distributed.share(5) == range(5)
    assert distributed.rounds(5, 2) == [[0, 1], [2, 3], [4]]
    assert distributed.rounds(0) == []
    assert distributed.on_main(lambda: 7, "x") == 7
    assert distributed.on_every_rank(lambda: 8, "x") == 8
    problem = ValueError("bad input")

    def fail():
        raise problem

    for helper in (distributed.on_main, distributed.on_every_rank):
        with pytest.raises(ValueError) as raised:
            helper(fail, "x")
        assert raised.value is problem  # as it is, not wrapped
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap_model(model, torch.device("cpu")) is model
    assert distributed.local_device("cpu") == torch.device("cpu")
    distributed.barrier()
    distributed.teardown()


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def two_process_training(tmp_path_factory):
    """Six epochs of the tiny configuration in two processes: what each process held."""
    out = tmp_path_factory.mktemp("two")
    start = time.monotonic()
    run = _ok(torchrun("train", str(out), "6"))
    held = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return {"out": out, "held": held, "seconds": time.monotonic() - start, "run": run}


def _without_timing(history: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(history)
    return frame.drop(columns=[c for c in frame if "seconds" in c or c == "crops_per_s"])


def test_processes_hold_the_same_ema_maps_and_weights(two_process_training):
    """(a) After every EMA pass (image i predicted by process i mod 2, the predictions
    exchanged) both processes hold the same maps, bit for bit; the weights, batch norm
    statistics and history rows are the same too. The shared pass gives the maps that one
    process alone gives from the same network."""
    first, second = two_process_training["held"]
    assert (first["rank"], second["rank"], first["world_size"]) == (0, 1, 2)
    for key in ("ema", "ema_after"):
        assert first[key].keys() == second[key].keys()
        for image_id in first[key]:
            assert torch.equal(first[key][image_id], second[key][image_id]), image_id
    for name, tensor in first["model"].items():
        assert torch.equal(tensor, second["model"][name]), name
    pd.testing.assert_frame_equal(
        _without_timing(first["history"]), _without_timing(second["history"])
    )
    assert any(not torch.equal(first["ema"][i], first["ema_after"][i]) for i in first["ema"])
    alone = Trainer.resume(
        two_process_training["out"] / "state.pt", tiny_samples(5),
        val=tiny_samples(3, offset=10), device="cpu", verbose=False,
    )  # fmt: skip
    alone.update_ema()
    for image_id in alone.ema.ids:
        assert np.array_equal(alone.ema.get(image_id), first["ema_after"][image_id].numpy())


def test_loss_goes_down_in_two_processes(two_process_training):
    """(b) The loss, averaged over both processes, falls over six epochs; validation is
    shared and every epoch has 8 crops, 2 steps of 2 crops in each of the 2 processes."""
    history = pd.DataFrame(two_process_training["held"][0]["history"])
    assert len(history) == 6 and np.isfinite(history["loss"]).all()
    assert history["loss"].iloc[-2:].mean() < 0.7 * history["loss"].iloc[:2].mean()
    assert history["iteration"].tolist() == [2, 4, 6, 8, 10, 12]
    assert history["pseudo_active"].iloc[-1]
    assert history["val_iou_full_masks"].notna().sum() == 3  # epochs 1, 3 and 5
    assert "2 processes work together" in two_process_training["run"].stdout


def test_two_process_run_resumed_in_two_processes_equals_the_run_straight(
    two_process_training, tmp_path
):
    """(c) Stopped after epoch 4 and resumed from its state, in two processes again: the
    same weights, EMA maps and history as the six epochs straight (the augmentation of
    each process is made afresh each epoch, so it needs no saving)."""
    _ok(torchrun("train", str(tmp_path), "6", "4"))
    straight = two_process_training["held"][0]
    resumed = torch.load(tmp_path / "rank0.pt", weights_only=False)
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    for image_id, ema in straight["ema"].items():
        assert torch.equal(ema, resumed["ema"][image_id]), image_id
    pd.testing.assert_frame_equal(
        _without_timing(straight["history"]), _without_timing(resumed["history"])
    )


def test_two_process_state_resumes_in_one_process(two_process_training, tmp_path):
    """(c) The state the main process wrote resumes alone: the same weights and EMA
    maps, and training goes on from epoch 6."""
    state = load_checkpoint(two_process_training["out"] / "state.pt")
    assert state["world_size"] == 2 and state["epoch"] == 6
    first = two_process_training["held"][0]
    resumed = Trainer.resume(
        two_process_training["out"] / "state.pt", tiny_samples(5),
        val=tiny_samples(3, offset=10), device="cpu", verbose=False,
    )  # fmt: skip
    assert resumed.resumed_world_size == 2 and resumed.world_size == 1
    weights = resumed.model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in first["model"].items())
    for image_id in resumed.ema.ids:
        assert np.array_equal(resumed.ema.get(image_id), first["ema"][image_id].numpy())
    history = resumed.fit(8, checkpoint=tmp_path / "alone.pt", progress=False)
    assert history["epoch"].tolist() == list(range(8))
    assert history["iteration"].tolist()[-2:] == [16, 20]  # 4 steps an epoch alone
    assert load_checkpoint(tmp_path / "alone.pt")["world_size"] == 1


def test_one_process_state_resumes_in_two_processes_by_the_command_line(
    tiny_profile, tmp_path, capsys
):
    """(c) ``s2l train`` alone for 2 epochs, then under torchrun with --resume to 4: one
    model, one state and one history of 4 rows, written by the main process."""
    images, scribbles = _own_images(tmp_path, n=4)
    out = tmp_path / "runs" / "m.pt"
    args = ["train", "--images", str(images), "--scribbles", str(scribbles), "--quiet"]
    args += ["--scribble-format", "napari", "--profile", "smoke", "--out", str(out)]
    args += ["--device", "cpu"]
    assert main([*args, "--epochs", "2"]) == 0
    capsys.readouterr()
    run = _ok(torchrun("cli", *args, "--epochs", "4", "--resume"))
    assert run.stdout.count("resumed from") == 1  # the main process says it, once
    assert "(written by 1 process, continued by 2)" in run.stdout
    history = pd.read_csv(out.with_name("m.history.csv"))
    assert history["epoch"].tolist() == [0, 1, 2, 3]
    assert history["iteration"].tolist() == [4, 8, 10, 12]  # 4 steps alone, then 2
    state = load_checkpoint(out.with_name("m.state.pt"))
    assert state["world_size"] == 2 and state["epoch"] == 4
    assert load_checkpoint(out)["selected"]["epoch"] == 3
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "m.history.csv", "m.pt", "m.state.pt"
    ]  # fmt: skip


# ----------------------------------------------------------------------------- prediction


def _folder(path: Path) -> dict[str, object]:
    """A prediction folder's label images (arrays) and record."""
    contents: dict[str, object] = {}
    for file in sorted(path.iterdir()):
        contents[file.name] = read_json(file) if file.suffix == ".json" else read_image(file)
    return contents


def _same_folders(a: Path, b: Path) -> None:
    first, second = _folder(a), _folder(b)
    assert first.keys() == second.keys()
    for name, value in first.items():
        if isinstance(value, dict):
            assert value == second[name], name
        else:
            assert np.array_equal(value, second[name]), name


def test_predict_in_two_processes_equals_one(two_process_training, tmp_path):
    """(d) Five images of three sizes, predicted by two processes (3 and 2 images) into a
    new folder, then again with --overwrite into it: the same files, the same labels and
    the same record as one process writes."""
    checkpoint = two_process_training["out"] / "state.pt"
    images = tmp_path / "images"
    for k, shape in enumerate([(48, 48), (60, 80), (48, 48), (72, 56), (50, 64)]):
        write_image(images / f"cells_{k}.png", synthetic_nuclei(30 + k, shape)[0])
    common = ["--quiet", "--device", "cpu", "--scale", "1"]
    first = [str(checkpoint), str(images), "OUT", "--probability", *common]
    again = [str(checkpoint), str(images), "OUT", "--mode", "semantic", "--overwrite", *common]

    def commands(out: Path) -> list[list[str]]:
        return [["predict", *(str(out) if a == "OUT" else a for a in c)] for c in (first, again)]

    alone, together = tmp_path / "alone", tmp_path / "together"
    snapshots = {}
    for step, command in enumerate(commands(alone)):
        assert main(command) == 0
        snapshots[step] = shutil.copytree(alone, tmp_path / f"alone_{step}")
    run = _ok(torchrun("cli", *commands(together)[0]))
    assert run.stdout.count("wrote 5 label images") == 1
    _same_folders(snapshots[0], together)
    _ok(torchrun("cli", *commands(together)[1]))
    _same_folders(snapshots[1], together)
    assert read_json(together / "s2l_predict.json")["written_before"] == [
        f"cells_{k}_prob.tif" for k in range(5)
    ]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ----------------------------------------------------------------------------- failures


def test_one_failing_process_stops_training(tiny_profile, tmp_path):
    """(e) Process 1 fails in its first EMA pass while process 0 waits for its
    predictions: both stop, well within the bound, with an error, and nothing is written
    beside --out but the states of finished epochs (none here)."""
    images, scribbles = _own_images(tmp_path, n=4)
    out = tmp_path / "runs" / "m.pt"
    args = ["train", "--images", str(images), "--scribbles", str(scribbles), "--quiet"]
    args += ["--scribble-format", "napari", "--profile", "smoke", "--out", str(out)]
    fail = {"S2L_TEST_FAIL": "s2l_core.train:Trainer.update_ema", "S2L_TEST_FAIL_RANK": "1"}
    start = time.monotonic()
    run = torchrun("cli", *args, "--device", "cpu", "--epochs", "3", env=fail)
    assert run.returncode != 0
    assert time.monotonic() - start < 60
    assert "s2l train (process 1 of 2): error: injected failure in Trainer.update_ema" in (
        run.stderr
    )
    assert not out.exists() and not out.with_name("m.state.pt").exists()
    assert [p.name for p in out.parent.iterdir()] == []


def test_an_unreadable_image_of_one_process_stops_predict(two_process_training, tmp_path, capsys):
    """(e) The broken image falls to process 1: both processes fail, the error names the
    file, and no output folder is made; the images process 0 finished are kept. Once the
    image is mended, a run alone predicts only it, writes the folder and leaves no
    temporary behind (not even one of a process that torchrun stopped before it could
    clean up)."""
    images = tmp_path / "images"
    for k in range(3):
        write_image(images / f"cells_{k}.png", synthetic_nuclei(k, (48, 48))[0])
    (images / "cells_1.png").write_bytes(b"not an image")  # images 0, 2 on process 0
    out = tmp_path / "labels"
    checkpoint = str(two_process_training["out"] / "state.pt")
    run = torchrun("cli", "predict", checkpoint, str(images), str(out), "--device", "cpu")
    assert run.returncode != 0
    assert "s2l predict (process 1 of 2): error: cannot read" in run.stderr
    assert "cells_1.png" in run.stderr
    assert "process 1 of 2 failed while predicting its share of the images" in run.stderr
    assert not out.exists() and "wrote" not in run.stdout
    (kept,) = tmp_path.glob(".labels.unfinished.*")
    assert "2 of 3 images are done and kept in" in run.stderr
    assert sorted(p.name for p in kept.glob("*.png")) == ["cells_0.png", "cells_2.png"]
    write_image(images / "cells_1.png", synthetic_nuclei(1, (48, 48))[0])
    capsys.readouterr()
    assert main(["predict", checkpoint, str(images), str(out), "--quiet", "--device", "cpu"]) == 0
    assert "2 of 3 images were done" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir())[:3] == [f"cells_{k}.png" for k in range(3)]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
