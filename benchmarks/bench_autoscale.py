"""Benchmark: which rule should ``scale="auto"`` follow on images the network never saw?

Each network of the generalization benchmark that was trained without an acquisition
group (``bench_generalization.py``, ``<work>/ckpt``) predicts every image of that group
at a grid of scales (:data:`GRID`), and the in-distribution network predicts the test
split magnified x2 and x3 (nuclei far larger than any in training). For every image and
scale the labels are scored (the default preset without test-time augmentation) and the
nuclei measured, so that any rule mapping measured diameters to a scale can be scored
afterwards without predicting again (each rule's scale is rounded to the nearest grid
scale, in log space). The rules compared are in :func:`rules`.

Usage (after ``bench_generalization.py run``, whose weights it reads)::

    python benchmarks/bench_autoscale.py --work runs/generalization

``--cases`` measures only some cases (two processes can share the work); a later run
reuses every measurement already in ``--work``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

#: Scales each image is predicted at.
GRID = (0.25, 0.35, 0.5, 0.7, 0.85, 1.0, 1.2, 1.4, 1.7, 2.0)


def measure_grid(model, raw, truth, grid=GRID, device="cpu") -> list[dict]:
    """One row per grid scale: IoU, AP and the nuclei's diameter measured on the
    prediction at that scale (which has the image's own size, so the diameter is in the
    image's pixels)."""
    from s2l_core.augment import normalize_image
    from s2l_core.infer import predict_foreground
    from s2l_core.metrics import evaluate_image
    from s2l_core.predict import Preset, foreground_to_instances, labels_of, object_diameter

    x = normalize_image(raw)
    post = Preset(tta=False)
    rows = []
    for s in grid:
        if min(x.shape[-2:]) * s < 16:
            continue
        prob = predict_foreground(model, x, device=device, scale=s)
        scores = evaluate_image(labels_of(prob, post), truth)
        measured = object_diameter(foreground_to_instances(prob, threshold=0.5))
        rows.append(
            {"scale": s, "iou": float(scores["iou"]), "ap": float(scores["ap"]),
             "measured": measured}
        )  # fmt: skip
    return rows


def snap(scale: float, available) -> float:
    """The grid scale nearest to ``scale`` in log space."""
    available = np.asarray(sorted(available))
    return float(available[np.argmin(np.abs(np.log(available) - np.log(scale)))])


def rule_scale(d: float, up: float, shrink_above: float, shrink_to: float) -> float:
    """Scale for nuclei of measured diameter ``d``: magnify towards ``up`` when smaller
    (at most 2x), shrink towards ``shrink_to`` when larger than ``shrink_above`` (at most
    4x), else 1."""
    if not np.isfinite(d) or d <= 0:
        return 1.0
    if d < up:
        return float(min(2.0, up / d))
    if d > shrink_above:
        return float(max(0.25, shrink_to / d))
    return 1.0


def rules() -> dict:
    """Rules: name -> function(measure) -> scale, where ``measure(s)`` is the diameter
    measured on the prediction at grid scale ``s``."""

    def make(up, above, to, remeasure):
        def rule(measure):
            s = rule_scale(measure(1.0), up, above, to)
            if s != 1.0 and (remeasure == "both" or (remeasure == "shrink" and s < 1)):
                again = rule_scale(measure(s), up, above, to)
                if max(again / s, s / again) > 1.25:
                    s = again
            return s

        return rule

    def half(up, to, above):
        """Nuclei measured at scale 1, and again at 0.5 where they look larger than
        ``above`` (a network sees only parts of nuclei far larger than its training's)."""

        def rule(measure):
            d = measure(1.0)
            if np.isfinite(d) and d > above:
                d = max(d, measure(0.5))
            return rule_scale(d, up, to, to)

        return rule

    def chosen(below):
        """The rule of ``predict_probability``: magnify nuclei under ``below`` pixels to
        30, shrink nuclei over 30 to 30 after a second look at half size."""

        def rule(measure):
            d = measure(1.0)
            if not np.isfinite(d) or below <= d <= 30:
                return 1.0
            if d > 30:
                d = max(d, measure(0.5))
            return float(np.clip(30 / d, 0.25, 2.0))

        return rule

    out = {"scale 1": lambda m: 1.0}
    for up in (20, 25, 30, 40):
        out[f"both ways to {up}, over {up} measured at 0.5 too"] = half(up, up, up)
    for below in (18, 20, 25):
        out[f"magnify under {below} to 30, shrink over 30 (0.5 too)"] = chosen(below)
    for up in (30, 40):
        out[f"up to {up}"] = make(up, np.inf, up, "none")
        out[f"both ways to {up}"] = make(up, up, up, "none")
        out[f"both ways to {up}, remeasured"] = make(up, up, up, "both")
        for above in (50, 60):
            out[f"up to {up}, above {above} to 40, remeasured"] = make(up, above, 40, "shrink")
    return out


def score_rules(table):
    """Mean IoU and AP of every rule per case (held-out group or shift)."""
    import pandas as pd

    results = []
    for (case, image_id), rows in table.groupby(["case", "image_id"]):
        rows = rows.set_index("scale")

        def measure(s, rows=rows):
            s = snap(s, rows.index)
            return rows.loc[s, "measured"]  # the probability has the image's size

        for name, rule in rules().items():
            s = snap(rule(measure), rows.index)
            results.append(
                {"case": case, "image_id": image_id, "rule": name, "scale": s,
                 "iou": rows.loc[s, "iou"], "ap": rows.loc[s, "ap"]}
            )  # fmt: skip
    return pd.DataFrame(results)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/generalization")
    parser.add_argument("--dataset", help="a prepared dataset folder (default: the cache)")
    parser.add_argument("--source")
    parser.add_argument("--variant", default="s2l")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", nargs="+", help="measure only these cases")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "generalization")
    args = parser.parse_args(argv)

    import pandas as pd
    from bench_generalization import IN_DISTRIBUTION, folds, open_data, shift_image

    from s2l_core.files import atomic_path
    from s2l_core.predict import load_model

    work = Path(args.work)
    dataset, _ = open_data({"dataset": args.dataset, "source": args.source, "ratio": 0.3})
    tag = "_".join(c.replace(" ", "") for c in args.cases) if args.cases else "all"
    grid_csv = work / f"autoscale_{args.variant}_s{args.seed}_{tag}.csv"
    # Measurements of earlier runs (each run's cases in a file of its own) are reused.
    earlier = sorted(work.glob(f"autoscale_{args.variant}_s{args.seed}_*.csv"))
    done = (
        pd.concat([pd.read_csv(p, dtype={"image_id": str}) for p in earlier], ignore_index=True)
        if earlier
        else None
    )
    mine = pd.read_csv(grid_csv, dtype={"image_id": str}) if grid_csv.is_file() else None
    cases = []
    for fold, (_, _, ids) in folds(dataset, "fluorescence").items():
        name = f"{args.variant}__fluorescence__{fold}__s{args.seed}.pt"
        if fold == IN_DISTRIBUTION:
            for factor in (2.0, 3.0):
                cases.append((f"test x{factor:g}", name, ids, factor))
        else:
            cases.append((f"held-out {fold}", name, ids, 1.0))
    for case, name, ids, factor in cases:
        if done is not None and case in set(done["case"]):
            continue
        if args.cases and case not in args.cases:
            continue
        model, _ = load_model(work / "ckpt" / name, "cpu")
        rows = []
        for image_id in ids:
            raw, truth = dataset.image(image_id), dataset.labels(image_id)
            if factor != 1.0:
                raw, truth = shift_image(raw, truth, "scale", factor, seed=0)
            grid = GRID if factor == 1.0 else [s for s in GRID if s <= 1.0]
            for r in measure_grid(model, raw, truth, grid):
                rows.append(r | {"case": case, "image_id": image_id})
        part = pd.DataFrame(rows)
        done = part if done is None else pd.concat([done, part], ignore_index=True)
        mine = part if mine is None else pd.concat([mine, part], ignore_index=True)
        with atomic_path(grid_csv) as tmp:
            mine.to_csv(tmp, index=False)
        print(f"{case}: {len(ids)} images", flush=True)
    scored = score_rules(done)
    summary = scored.groupby(["rule", "case"])[["iou", "ap"]].mean().unstack("case")
    iou = summary["iou"]
    iou["mean"] = iou.mean(axis=1)
    iou["min"] = iou.drop(columns="mean").min(axis=1)
    ap = summary["ap"]
    ap["mean"] = ap.mean(axis=1)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    text = "\n".join(
        [
            f'# Rules for `scale="auto"` ({args.variant}, seed {args.seed})',
            "",
            f"Command: `{command}`",
            "",
            "Foreground IoU per case; default preset without TTA; scales on the grid "
            f"{', '.join(map(str, GRID))}.",
            "",
            iou.sort_values("mean", ascending=False).round(3).to_markdown(),
            "",
            "Average precision (DSB):",
            "",
            ap.sort_values("mean", ascending=False).round(3).to_markdown(),
            "",
        ]
    )
    args.output.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.output / f"autoscale_{args.variant}_s{args.seed}.md") as tmp:
        Path(tmp).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
