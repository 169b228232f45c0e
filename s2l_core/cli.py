"""The ``s2l`` command line: batch use without a notebook.

``s2l prepare`` fetches, verifies and prepares BBBC038v1 and synthesizes its scribbles.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from s2l_core import data, scribbles

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
        type=float,
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``s2l`` command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (data.DataError, ValueError, FileNotFoundError) as err:
        print(f"s2l {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
