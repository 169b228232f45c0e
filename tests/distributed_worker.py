"""One process of a multi-process run, for test_distributed.py (started by torchrun).

``python -m torch.distributed.run --nproc_per_node=2 tests/distributed_worker.py MODE ...``

- ``train OUT EPOCHS [STOP]``: trains :data:`TINY` on :func:`tiny_samples` with
  :class:`s2l_core.train.Trainer` (checkpoint ``OUT/state.pt``), then writes what this
  process holds to ``OUT/rank<R>.pt`` (EMA maps, weights, history), makes one more EMA
  pass and writes the maps after it as well. With ``STOP``, it stops after epoch
  ``STOP``, and a trainer resumed from the checkpoint goes on to ``EPOCHS``;
- ``cli ARGS [:: ARGS ...]``: runs ``s2l ARGS`` (one command after another), with the
  ``smoke`` profile replaced by :data:`TINY` (a network small enough for tests).

``$S2L_TEST_FAIL`` (``"module:Name.attr"``) and ``$S2L_TEST_FAIL_RANK`` make that
function raise on that process only, to test that one failure stops every process.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import torch

from s2l_core.augment import AugmentConfig
from s2l_core.config import PROFILES, TrainConfig

#: A network and budget small enough for tests: 4 steps of 2 crops an epoch alone, 2 with
#: two processes; pseudo-labels from epoch 2; validation every 2 epochs.
TINY = TrainConfig(
    epochs=6, batch_size=2, samples_per_epoch=8, warmup_epochs=2, ema_every=1, ema_start=0,
    val_every=2, optimizer="adamw", lr_encoder=3e-3, lr_decoder=1e-2,
    model={"base_channels": 8, "depth": 2}, augment=AugmentConfig(crop_size=48),
)  # fmt: skip


def tiny_samples(n: int, offset: int = 0, shape: tuple[int, int] = (48, 48)) -> list:
    """``n`` synthetic 48×48 images with a few disk nuclei and 50 % scribbles."""
    from conftest import synthetic_nuclei

    from s2l_core.samples import TrainSample
    from s2l_core.scribbles import synthesize_scribbles

    samples = []
    for k in range(offset, offset + n):
        image, labels = synthetic_nuclei(k, shape, n=3)
        scribble = synthesize_scribbles(labels, 0.5, seed=k, key=str(k)).scribble
        samples.append(TrainSample.from_arrays(f"tiny{k}", image, scribble, labels))
    return samples


def _inject_failure() -> None:
    """Make ``$S2L_TEST_FAIL`` raise on process ``$S2L_TEST_FAIL_RANK``."""
    target = os.environ.get("S2L_TEST_FAIL")
    if not target or os.environ.get("RANK") != os.environ.get("S2L_TEST_FAIL_RANK", "1"):
        return
    module_name, path = target.split(":")
    *owners, name = path.split(".")
    owner = importlib.import_module(module_name)
    for part in owners:
        owner = getattr(owner, part)

    def fail(*args, **kwargs):
        raise RuntimeError(f"injected failure in {path} on process {os.environ['RANK']}")

    setattr(owner, name, fail)


def _train(out: Path, epochs: int, stop: int | None = None) -> None:
    from s2l_core import distributed
    from s2l_core.train import Trainer

    distributed.setup("cpu")
    train, val = tiny_samples(5), tiny_samples(3, offset=10)
    trainer = Trainer(train, TINY, val=val, device="cpu")
    if stop is not None:
        trainer.fit(stop, checkpoint=out / "state.pt", progress=False)
        trainer = Trainer.resume(out / "state.pt", train, val=val, device="cpu")
    trainer.fit(epochs, checkpoint=out / "state.pt", progress=False)

    def maps() -> dict[str, torch.Tensor]:
        return {i: torch.from_numpy(trainer.ema.get(i, copy=True)) for i in trainer.ema.ids}

    held = {
        "rank": distributed.rank(),
        "world_size": distributed.world_size(),
        "model": trainer.model.state_dict(),
        "ema": maps(),
        "history": trainer.history,
    }
    trainer.update_ema()
    held["ema_after"] = maps()
    torch.save(held, out / f"rank{held['rank']}.pt")
    distributed.teardown()


def _cli(args: list[str]) -> int:
    from s2l_core.cli import main

    PROFILES["smoke"] = TINY
    commands, current = [], []
    for arg in args:
        if arg == "::":
            commands.append(current)
            current = []
        else:
            current.append(arg)
    commands.append(current)
    for command in commands:
        status = main(command)
        if status:
            return status
    return 0


def main() -> None:
    torch.set_num_threads(1)
    _inject_failure()
    mode, *rest = sys.argv[1:]
    if mode == "train":
        _train(Path(rest[0]), int(rest[1]), int(rest[2]) if len(rest) > 2 else None)
    elif mode == "cli":
        sys.exit(_cli(rest))
    else:
        sys.exit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
