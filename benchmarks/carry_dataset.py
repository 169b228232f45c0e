"""Copy the part of a prepared dataset that one modality's benchmark needs, small enough
to travel with the working tree to another machine.

The copy holds that modality's images and labels (every split), its scribbles of one
seed and one ratio, and a manifest and scribble summary of just those images; it opens
as a :class:`s2l_core.data.PreparedDataset` and gives the same folds, samples and scores
as the whole. The fluorescence images with their 30 % scribbles come to about 51 MB.
Usage, from the repository root::

    python benchmarks/carry_dataset.py runs/carry/bbbc038
    OUT=runs/gpu DATASET=runs/carry/bbbc038 bash benchmarks/run_generalization_gpu.sh
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from s2l_core import data, scribbles
from s2l_core.files import atomic_dir, write_json


def carry(
    dataset: data.PreparedDataset,
    scribble_set: scribbles.ScribbleSet,
    target: Path,
    modality: str = "fluorescence",
    ratio: float = 0.3,
) -> Path:
    """Write the copy to the new folder ``target`` (atomically) and return it."""
    ids = dataset.ids(modality)
    if not ids:
        raise ValueError(f"{dataset.root} holds no {modality} images")
    if ratio not in scribble_set.ratios:
        raise ValueError(f"no scribbles at ratio {ratio}; this set has {scribble_set.ratios}")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not an empty folder; choose a new one")
    wanted = set(ids)
    with atomic_dir(target, replace=False) as tmp:
        for kind in ("images", "labels"):
            (tmp / kind).mkdir()
            for i in ids:
                shutil.copy2(dataset.root / kind / f"{i}.png", tmp / kind / f"{i}.png")
        dataset.manifest[dataset.manifest["image_id"].isin(wanted)].to_csv(
            tmp / "manifest.csv", index=False
        )
        info = dict(
            dataset.info,
            n_images=len(ids),
            modality_counts={modality: len(ids)},
            carried={"modality": modality, "ratio": ratio},
        )
        write_json(tmp / "dataset.json", info)
        rel = scribble_set.root.relative_to(dataset.root)
        ratio_dir = scribble_set.path(ids[0], ratio).parent.name
        (tmp / rel / ratio_dir).mkdir(parents=True)
        for i in ids:
            path = scribble_set.path(i, ratio)
            shutil.copy2(path, tmp / rel / ratio_dir / path.name)
        summary = scribble_set.summary
        summary[summary["image_id"].isin(wanted) & (summary["ratio"] == ratio)].to_csv(
            tmp / rel / "summary.csv", index=False
        )
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", type=Path, help="the new folder of the copy")
    parser.add_argument("--dataset", help="a prepared dataset folder (default: the cache)")
    parser.add_argument("--modality", default="fluorescence", choices=data.MODALITIES)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0, help="the scribbles' seed")
    args = parser.parse_args(argv)
    dataset = data.PreparedDataset(args.dataset or data.default_cache_dir() / "bbbc038")
    out = carry(
        dataset, scribbles.ScribbleSet(dataset, args.seed), args.target, args.modality, args.ratio
    )
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {len(dataset.ids(args.modality))} images, {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
