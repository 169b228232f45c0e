"""The ``s2l`` command line: batch use without a notebook.

- ``s2l prepare``: fetch, verify and prepare BBBC038v1 and synthesize its scribbles;
- ``s2l train``: train Scribble2Label (or a baseline) on a BBBC038 modality or on a
  folder of your own images and scribbles, and write a checkpoint;
- ``s2l predict``: label a folder of images with a checkpoint.

``s2l train`` and ``s2l predict`` also run as several processes started by ``torchrun``
(``torchrun --nproc_per_node=N $(which s2l) train ...``) or ``srun``: they share the
work (:mod:`s2l_core.distributed`), the main process alone writes and reports, and a
failure of one process stops them all.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from s2l_core import checks, data, scribbles
from s2l_core.files import check_writable

__all__ = ["main"]


def _prepare(args: argparse.Namespace) -> int:
    dataset = data.prepare_dataset(
        args.source,
        args.cache_dir,
        split_seed=args.split_seed,
        workers=args.workers,
        progress=not args.quiet,
        force=args.force,
        expected_sha256=args.sha256,
    )
    table = dataset.manifest.groupby(["modality", "split"]).size().unstack(fill_value=0)
    print(f"prepared {len(dataset)} images in {dataset.root}")
    print(table.to_string())
    if args.ratios:
        scribble_set = scribbles.prepare_scribbles(
            dataset,
            args.ratios,
            seed=args.scribble_seed,
            workers=args.workers,
            progress=not args.quiet,
            force=args.force,
        )
        short = int((scribble_set.summary["bg_shortfall"] > 0).sum())
        print(f"scribbles at ratios {scribble_set.ratios} in {scribble_set.root}")
        if short:
            print(f"{short} image/ratio pairs have fewer background pieces than wanted")
    return 0


def _check_out(out: Path, state_path: Path, resume: bool) -> None:
    """Refuse, before any data is read, an ``--out`` that training could not write or
    that would replace an earlier result."""
    if out.is_dir():
        raise ValueError(
            f"--out {out} is a folder; give the checkpoint's file name, e.g. {out / 's2l.pt'}"
        )
    check_writable(out.parent)
    if resume and state_path.is_file():
        return
    for earlier in (state_path, out):
        if earlier.exists():
            resume_it = (
                "add --resume to continue that training, or " if earlier == state_path else ""
            )
            raise ValueError(
                f"{earlier} exists (an earlier run's); {resume_it}choose another --out (or "
                "delete it) to train anew"
            )


def _train(args: argparse.Namespace) -> int:
    from s2l_core import distributed, train
    from s2l_core import samples as training_samples
    from s2l_core.config import TrainConfig

    main_process = distributed.is_main()
    say = print if main_process else _silent
    progress = not args.quiet and main_process

    overrides = {}
    for name in (
        "epochs", "batch_size", "samples_per_epoch", "seed", "select", "affinity",
        "affinity_sigma", "dice",
    ):  # fmt: skip
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.baseline == "pce":
        overrides["use_pseudo"] = False
    if args.cpu_bf16:
        overrides["cpu_bf16"] = True
    config = TrainConfig.profile(args.profile, **overrides)
    out = Path(args.out)
    state_path = out.with_name(out.stem + ".state.pt")

    def check_out() -> bool:
        _check_out(out, state_path, args.resume)
        return args.resume and state_path.is_file()

    # The main process decides, so that all resume or all start anew.
    resume = distributed.on_main(check_out, "checking --out")
    if args.images:
        if not args.scribbles:
            raise ValueError("--images needs --scribbles (a folder of scribble images)")
        # The main process alone lists the images it skips (errors are raised, not said).
        with _said_by(main_process):
            samples = training_samples.load_folder_samples(
                args.images, args.scribbles, scribble_format=args.scribble_format,
                channel=args.channel,
            )  # fmt: skip
        val = []
    else:
        if args.channel is not None:
            raise ValueError("--channel applies to your own images (--images)")
        # Several processes prepare the cache one after the other (it is locked): the
        # first does the work, the others find it done; the main process reports.
        with _said_by(main_process):
            dataset = data.prepare_dataset(args.source, args.cache_dir, progress=progress)
            scribble_set = scribbles.prepare_scribbles(
                dataset, [args.ratio], seed=args.scribble_seed, progress=progress
            )
        full = args.baseline == "full"
        samples = training_samples.load_samples(
            dataset, dataset.ids(args.modality, "train"), scribble_set, args.ratio,
            full_masks=full,
        )  # fmt: skip
        val = training_samples.load_samples(
            dataset, dataset.ids(args.modality, "val"), scribble_set, args.ratio
        )
    if resume:
        trainer = train.Trainer.resume(state_path, samples, val=val, device=args.device)
        say(f"resumed from {state_path} at epoch {trainer.epoch}{_processes_note(trainer)}")
        if main_process:
            _say_kept(trainer.config.to_dict(), config.to_dict(), set(overrides) | {"profile"})
        total = args.epochs if args.epochs is not None else trainer.config.epochs
        if trainer.epoch >= total:
            say(f"{state_path} has trained {trainer.epoch} epochs already (asked: {total})")
    else:
        if args.resume and main_process:
            print(f"no training state at {state_path}: starting anew", file=sys.stderr)
        trainer = train.Trainer(samples, config, val=val, device=args.device)
    history = trainer.fit(args.epochs, checkpoint=state_path, progress=progress)
    from s2l_core.predict import Preset

    extra = {"baseline": args.baseline, "profile": args.profile}
    modality = None if args.images else args.modality
    extra["preset"] = Preset.for_training(args.baseline, modality).to_dict()
    if args.channel is not None:
        extra["channel"] = args.channel  # s2l predict takes the same channel by default
    trainer.export(out, extra=extra)
    history_path = out.with_name(out.stem + ".history.csv")
    distributed.on_main(
        lambda: history.to_csv(history_path, index=False), f"writing the history {history_path}"
    )
    say(f"model: {out}\ntraining state: {state_path}\nhistory: {history_path}")
    return 0


def _silent(*args: Any, **kwargs: Any) -> None:
    """``print`` for the processes other than the main one: they say nothing."""


def _said_by(main_process: bool) -> contextlib.AbstractContextManager:
    """Where the other processes of a run would say the same as the main one (skipped
    files, waiting for the cache's lock), only the main one says it; errors are raised,
    not said, so none is lost."""
    if main_process:
        return contextlib.nullcontext()
    return contextlib.redirect_stderr(io.StringIO())


def _processes_note(trainer: Any) -> str:
    """Where a resumed state was written by another number of processes: say so."""
    before, now = trainer.resumed_world_size, trainer.world_size
    if before is None or before == now:
        return ""
    return f" (written by {before} process{'es' if before != 1 else ''}, continued by {now})"


def _say_kept(saved: dict, asked: dict, given: set[str]) -> None:
    """Say which settings given now differ from the resumed run's, which keeps its own."""
    differ = [
        f"{k} {asked[k]!r} (kept: {saved[k]!r})"
        for k in sorted(given & set(saved))
        if k != "epochs" and saved[k] != asked.get(k)
    ]
    if differ:
        print(
            "--resume continues the saved run with its own settings; these options differ "
            f"and are not used: {', '.join(differ)}",
            file=sys.stderr,
        )


#: The most epochs ``s2l train`` takes (the ``full`` profile trains 200).
MAX_EPOCHS = 10_000


def epochs_argument(text: str) -> int:
    """``--epochs`` (an ``argparse`` type): a whole number from 1 to :data:`MAX_EPOCHS`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= value <= MAX_EPOCHS:
        raise argparse.ArgumentTypeError(
            f"must be a whole number from 1 to {MAX_EPOCHS:,}, got {text}"
        )
    return value


def _checked(check: Callable[[float], Any], text: str, extra: str = "") -> Any:
    """``text`` as a number that ``check`` (of :mod:`s2l_core.checks`) accepts, or an
    argparse error with the check's own words."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number{extra}, got {text!r}") from None
    try:
        return check(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def scale_argument(text: str) -> float | str:
    """``--scale`` (an ``argparse`` type): ``auto``, or a number
    :func:`s2l_core.checks.check_scale` accepts."""
    return text if text == "auto" else _checked(checks.check_scale, text, " or 'auto'")


def probability_argument(text: str) -> float:
    """``--min-peak`` (an ``argparse`` type): :func:`s2l_core.checks.check_min_peak`."""
    return _checked(checks.check_min_peak, text)


def ratio_argument(text: str) -> float:
    """``--ratio`` and ``--ratios`` (an ``argparse`` type): a scribble ratio,
    :func:`s2l_core.checks.check_ratio`."""
    return _checked(checks.check_ratio, text)


def threshold_argument(text: str) -> float:
    """``--threshold`` (an ``argparse`` type): :func:`s2l_core.checks.check_threshold`."""
    return _checked(checks.check_threshold, text)


def split_depth_argument(text: str) -> float:
    """``--split-depth`` (an ``argparse`` type): :func:`s2l_core.checks.positive_pixels`."""
    return _checked(lambda value: checks.positive_pixels("split_depth", value), text)


def smooth_argument(text: str) -> float:
    """``--smooth`` (an ``argparse`` type): :func:`s2l_core.checks.check_smooth`."""
    return _checked(checks.check_smooth, text)


def _predict(args: argparse.Namespace) -> int:
    from s2l_core import distributed
    from s2l_core.predict import FolderOutput, predict_folder

    # The settings given on the command line change the checkpoint's preset.
    preset = dict(
        threshold=args.threshold, method=args.method, min_size=args.min_size,
        scale=args.scale, min_peak=args.min_peak, tta=args.tta, smooth=args.smooth,
        split_depth=args.split_depth,
    )  # fmt: skip
    output = FolderOutput(
        mode=args.mode, suffix=args.format, probability=args.probability,
        overwrite=args.overwrite,
    )  # fmt: skip
    written = predict_folder(
        args.checkpoint, args.input_dir, args.output_dir, preset=preset, output=output,
        channel=args.channel, device=args.device, progress=not args.quiet,
    )  # fmt: skip
    if distributed.is_main():
        print(f"wrote {len(written)} label images to {args.output_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``s2l``."""
    parser = argparse.ArgumentParser(
        prog="s2l", description="Scribble2Label: nuclei segmentation trained from scribbles."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser(
        "prepare",
        help="fetch, verify and prepare BBBC038v1 and its scribbles",
        description=(
            "Fetch stage1_train.zip (official address, URL or local path), verify and "
            "extract it, prepare images, 16-bit instance labels, modalities and the "
            "seeded split, and synthesize scribbles. Finished steps are reused."
        ),
    )
    prep.add_argument(
        "--source",
        help=f"URL or path of stage1_train.zip (default: ${data.SOURCE_ENV} or the official URL)",
    )
    prep.add_argument(
        "--cache-dir", help=f"cache folder (default: ${data.CACHE_ENV} or ~/.cache/scribble2label)"
    )
    prep.add_argument("--split-seed", type=int, default=0, help="seed of the 60/20/20 split")
    prep.add_argument(
        "--ratios",
        type=ratio_argument,
        nargs="*",
        default=list(scribbles.RATIOS),
        help="scribble ratios to synthesize (none: skip scribbles)",
    )
    prep.add_argument("--scribble-seed", type=int, default=0, help="seed of scribble synthesis")
    prep.add_argument("--workers", type=int, help="worker processes (default: all CPUs)")
    prep.add_argument("--sha256", help="required sha256 of the archive")
    prep.add_argument("--force", action="store_true", help="redo every step")
    prep.add_argument("--quiet", action="store_true", help="no progress bars")
    prep.set_defaults(func=_prepare)

    tr = sub.add_parser(
        "train",
        help="train Scribble2Label or a baseline and write a checkpoint",
        description=(
            "Train on a BBBC038 modality (its training split, with synthesized scribbles) "
            "or on your own images (--images with --scribbles). Writes OUT (the selected "
            "weights), OUT.state.pt (the full training state, for --resume) and "
            "OUT.history.csv."
        ),
    )
    tr.add_argument("--out", required=True, help="checkpoint to write, e.g. runs/s2l.pt")
    tr.add_argument("--profile", default="cpu", choices=["smoke", "cpu", "full"])
    tr.add_argument(
        "--baseline", default="s2l", choices=["s2l", "pce", "full"],
        help="s2l: Scribble2Label; pce: scribbles only; full: full masks",
    )  # fmt: skip
    tr.add_argument("--modality", default="fluorescence", choices=list(data.MODALITIES))
    tr.add_argument("--ratio", type=ratio_argument, default=0.3, help="scribble ratio")
    tr.add_argument("--images", help="folder of your own images")
    tr.add_argument("--scribbles", help="folder of their scribbles (same file names)")
    tr.add_argument("--scribble-format", default="s2l", choices=["s2l", "napari"])
    tr.add_argument(
        "--channel", type=int,
        help="with --images: the channel (from 0) of multi-channel images to train on",
    )  # fmt: skip
    tr.add_argument("--source", help="stage1_train.zip URL or path (see s2l prepare)")
    tr.add_argument("--cache-dir", help="cache folder (see s2l prepare)")
    tr.add_argument("--scribble-seed", type=int, default=0)
    tr.add_argument(
        "--epochs", type=epochs_argument,
        help=f"epochs to train in all (1 to {MAX_EPOCHS:,}; default: the profile's)",
    )  # fmt: skip
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--samples-per-epoch", type=int)
    tr.add_argument("--seed", type=int)
    tr.add_argument(
        "--select", choices=["last", "val_scribble", "val_iou_full_masks"],
        help="which weights to keep (default: last epoch)",
    )  # fmt: skip
    tr.add_argument(
        "--affinity", type=float,
        help="weight of the local affinity regulariser (an extension; default 0: off)",
    )  # fmt: skip
    tr.add_argument(
        "--affinity-sigma", type=float,
        help="its intensity scale (default 0.1)",
    )  # fmt: skip
    tr.add_argument(
        "--dice", type=float,
        help="weight of a soft Dice term on scribbles and pseudo-labels (an extension; "
        "default 0: off)",
    )  # fmt: skip
    tr.add_argument(
        "--cpu-bf16", action="store_true",
        help="train in bfloat16 on a CPU that computes it natively (AVX512-BF16 or AMX), "
        "which is faster; elsewhere float32",
    )  # fmt: skip
    tr.add_argument("--device", default="auto", help="auto, cpu or cuda")
    tr.add_argument(
        "--resume", action="store_true",
        help="continue from OUT.state.pt with its saved settings (--epochs sets the total)",
    )  # fmt: skip
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    tr.set_defaults(func=_train)

    pr = sub.add_parser(
        "predict",
        help="label a folder of images with a checkpoint",
        description=(
            "Predict every image (PNG, TIFF, JPEG; grey, RGB, RGBA or one channel of a "
            "multi-channel image; 8/16-bit; any size) of "
            "INPUT_DIR into OUTPUT_DIR with the same file names: instance labels (uint16) "
            "or a 0/1 mask. OUTPUT_DIR appears only when every image is done; a run that "
            "stops keeps the images it finished, and the same command goes on from there. "
            "Settings "
            "not given come from the checkpoint's preset (or the package's defaults), "
            "which are the settings that score best on images of unseen acquisitions."
        ),
    )
    pr.add_argument("checkpoint")
    pr.add_argument("input_dir")
    pr.add_argument("output_dir")
    pr.add_argument("--mode", default="instance", choices=["instance", "semantic"])
    pr.add_argument(
        "--method", choices=["watershed", "components"],
        help="how the foreground is split into nuclei (default: the checkpoint's preset, "
        "else watershed)",
    )  # fmt: skip
    pr.add_argument(
        "--threshold", type=threshold_argument,
        help="foreground where the probability exceeds this (default: the preset's, 0.6)",
    )  # fmt: skip
    pr.add_argument(
        "--split-depth", type=split_depth_argument,
        help="depth, in the network's pixels, of the valley between touching nuclei at "
        "which the watershed splits them (default: the preset's, 1)",
    )  # fmt: skip
    pr.add_argument(
        "--min-size", type=int, help="smallest object kept, in pixels (default: the preset's)"
    )
    pr.add_argument("--format", choices=[".tif", ".png"], help="output format")
    pr.add_argument("--probability", action="store_true", help="also write *_prob.tif")
    pr.add_argument(
        "--channel", type=int,
        help="the channel (from 0) of multi-channel images (default: the checkpoint's)",
    )  # fmt: skip
    pr.add_argument(
        "--scale", type=scale_argument,
        help="magnify images by this factor for the network, or 'auto': measure the "
        "nuclei and magnify small ones, shrink very large ones, towards the sizes the "
        "network segments best (default: the preset's, auto)",
    )  # fmt: skip
    pr.add_argument(
        "--min-peak", type=probability_argument,
        help="drop regions whose foreground probability never exceeds this (hysteresis; "
        "0 keeps all; default: the preset's)",
    )  # fmt: skip
    pr.add_argument(
        "--smooth", type=smooth_argument,
        help="smooth the foreground probability by a Gaussian of this many pixels before "
        "thresholding (0: off; default: the preset's)",
    )  # fmt: skip
    pr.add_argument(
        "--tta", action=argparse.BooleanOptionalAction,
        help="test-time augmentation: average the prediction over the eight turns and "
        "mirror images of each image, eight times the work (default: the preset's, on)",
    )  # fmt: skip
    pr.add_argument("--device", default="auto")
    pr.add_argument("--overwrite", action="store_true")
    pr.add_argument("--quiet", action="store_true")
    pr.set_defaults(func=_predict)
    return parser


_HINTS = {
    errno.EACCES: "check the permissions of that file or folder, or choose another",
    errno.EPERM: "check the permissions of that file or folder, or choose another",
    errno.EROFS: "choose a folder on a writable disk",
    errno.ENOSPC: "free some space on that disk, or choose a folder on another",
    errno.EDQUOT: "free some space within your quota, or choose a folder elsewhere",
    errno.ENOTDIR: "a folder was expected there",
    errno.EISDIR: "a file was expected there",
}


def _os_error(err: OSError) -> str:
    """One line for an error of the file system: the file, what went wrong, what to do."""
    where = err.filename if err.filename is not None else "a file"
    what = err.strerror or str(err)
    hint = _HINTS.get(err.errno)
    return f"{where}: {what}" + (f"; {hint}" if hint else "")


def _interrupted(args: argparse.Namespace) -> str:
    if args.command == "train":
        state = Path(args.out).with_name(Path(args.out).stem + ".state.pt")
        return (
            f"the state of the last finished epoch, if any, is in {state}; run the same "
            "command with --resume to continue"
        )
    if args.command == "predict":
        return (
            "nothing was written to the output folder; the images already done are kept, "
            "and the same command goes on from there"
        )
    return "nothing half-written was kept; run the command again to continue"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``s2l`` command line; return the exit status.

    0 on success; 2 for a bad option or input (a missing, malformed or refused file,
    an output that would replace something); 1 when the system fails the run (a folder
    that cannot be written, a full disk) or it is interrupted (Ctrl-C). Every error is
    one line on stderr that names the file and what to do.

    Started by ``torchrun`` or ``srun`` (:func:`s2l_core.distributed.setup`), ``train``
    and ``predict`` join the other processes first; errors then name the process
    (``s2l train (process 1 of 4): error: ...``). When one process fails, the others
    stop too: with 2 where they learn of its failure
    (:class:`s2l_core.distributed.RankFailed`), with 1 where they lose it
    (:class:`s2l_core.distributed.CollectiveError`).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    who = f"s2l {args.command}"
    together = False
    try:
        if args.command in ("train", "predict"):
            together = _join_processes(args.device)
            if together:
                from s2l_core.distributed import process_label

                who += process_label()
        status = args.func(args)
    except KeyboardInterrupt:
        print(f"{who}: interrupted; {_interrupted(args)}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"{who}: error: {err}", file=sys.stderr)
        # A DistributedError says which: 1 for a lost process, 2 for another's failure.
        return getattr(err, "exit_status", 2)
    except OSError as err:
        print(f"{who}: error: {_os_error(err)}", file=sys.stderr)
        return 1
    if together:  # after a failure the process just exits: the group may be broken
        from s2l_core.distributed import teardown

        teardown()
    return status


def _join_processes(device: str) -> bool:
    """Under torchrun or srun, join the other processes of the launch
    (:func:`s2l_core.distributed.setup`); whether there are others."""
    from s2l_core.distributed import setup

    return setup(device)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
