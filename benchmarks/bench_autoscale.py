"""Benchmark: which rule should ``scale="auto"`` follow on images the network never saw?

Each network of the generalization benchmark that was trained without an acquisition
group (``bench_generalization.py``, ``<work>/ckpt``) predicts every image of that group
at a grid of scales (:data:`GRID`), also with the group's images shrunk to a half and a
third (nuclei far smaller than any in training), and the in-distribution network
predicts the test split magnified x2 and x3 (nuclei far larger). Scales above 2
(:data:`GRID_UP`) are predicted only where the nuclei measure under 15 pixels at scale
1, the only images any rule magnifies that much. For every image and scale the labels
are scored twice (the default preset without test-time augmentation): with the
post-processing's sizes in the image's pixels, and in the network's (``min_size``,
``smooth`` and the watershed's ``split_depth`` divided by the scale, as
``predict_image`` does). The nuclei are measured too, so that any rule mapping measured
diameters to a scale can be scored afterwards without predicting again (each rule's
scale is rounded to the nearest grid scale, in log space). The rules compared are in
:func:`rules`.

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

#: Scales above 2, predicted only where the nuclei measure under :data:`SMALL` pixels.
GRID_UP = (2.4, 2.8, 3.4, 4.0, 4.8, 5.7)

#: Nuclei measured under this many pixels across at scale 1 are predicted at
#: :data:`GRID_UP` too.
SMALL = 15.0

#: Shrink factors of the held-out groups' images (1: as they are).
SHRINK = {"256x256": (1.0, 0.5, 0.33), "360x360": (1.0, 0.5, 0.33), "520x696": (1.0, 0.5, 0.33)}


def measure_grid(model, raw, truth, grid=GRID, device="cpu") -> list[dict]:
    """One row per grid scale: IoU and AP with the post-processing's sizes in the image's
    pixels (``iou``, ``ap``) and in the network's (``iou_net``, ``ap_net``), and the
    nuclei's diameter measured on the prediction at that scale (which has the image's
    own size, so the diameter is in the image's pixels). :data:`GRID_UP` is added where
    the nuclei measure under :data:`SMALL` pixels at scale 1."""
    from s2l_core.augment import normalize_image
    from s2l_core.infer import predict_foreground
    from s2l_core.metrics import evaluate_image
    from s2l_core.predict import Preset, labels_of, measure_nuclei

    x = normalize_image(raw)
    post = Preset(tta=False)
    rows = []
    grid = list(grid)
    while grid:
        s = grid.pop(0)
        if min(x.shape[-2:]) * s < 16:
            continue
        prob = predict_foreground(model, x, device=device, scale=s)
        image_px = evaluate_image(labels_of(prob, post), truth)
        net_px = evaluate_image(labels_of(prob, post, scale=s), truth)
        measured = measure_nuclei(prob)
        rows.append(
            {"scale": s, "iou": float(image_px["iou"]), "ap": float(image_px["ap"]),
             "iou_net": float(net_px["iou"]), "ap_net": float(net_px["ap"]),
             "measured": measured}
        )  # fmt: skip
        if s == 1.0 and np.isfinite(measured) and measured < SMALL:
            grid += [u for u in GRID_UP if u not in grid]
    return rows


def snap(scale: float, available) -> float:
    """The grid scale nearest to ``scale`` in log space."""
    available = np.asarray(sorted(available))
    return float(available[np.argmin(np.abs(np.log(available) - np.log(scale)))])


def rule_scale(d: float, below: float, to: float, top: float) -> float:
    """Scale for nuclei of measured diameter ``d``: magnify to ``to`` those under
    ``below`` (at most ``top`` times), shrink to ``to`` those over ``to`` (at most 4x),
    else 1."""
    if not np.isfinite(d) or d <= 0 or below <= d <= to:
        return 1.0
    return float(np.clip(to / d, 0.25, top))


def rules() -> dict:
    """Rules: name -> function(measure) -> scale, where ``measure(s)`` is the diameter
    measured on the prediction at grid scale ``s``. Nuclei over the target are measured
    again at half size (a network sees only parts of nuclei far larger than its
    training's, which look like small nuclei) and the larger diameter counts."""

    def rule(below, to, top):
        def pick(measure):
            d = measure(1.0)
            if np.isfinite(d) and d > to:
                d = max(d, measure(0.5))
            return rule_scale(d, below, to, top)

        return pick

    def ladder(looks, view, factor, below, to, top):
        """Nuclei measured at scale 1 and at each scale of ``looks``; a smaller scale
        whose nuclei, as the network sees them (diameter times scale), are between
        ``view[0]`` and ``view[1]`` pixels across (sizes it was trained on; a larger
        "nucleus" is a clump of small ones merged) and measure ``factor`` times those
        at scale 1 in the image's pixels shows nuclei that scale 1 only saw in parts:
        the largest such diameter counts."""

        def pick(measure):
            d = measure(1.0)
            if not np.isfinite(d):
                return 1.0
            for s in looks:
                m = measure(s)
                if np.isfinite(m) and view[0] <= m * s <= view[1] and m >= factor * d:
                    d = max(d, m)
            return rule_scale(d, below, to, top)

        return pick

    out = {"scale 1": lambda m: 1.0}
    for top in (2.0, 2.8, 4.0, 5.7):
        for below, to in ((20, 30), (25, 30), (30, 30), (20, 25)):
            out[f"magnify under {below} to {to} (at most {top:g}x), shrink over {to}"] = rule(
                below, to, top
            )
    for looks in ((0.5,), (0.5, 0.25), (0.5, 0.35, 0.25)):
        for view, factor in (
            ((10, np.inf), 1.5), ((15, np.inf), 1.5), ((15, np.inf), 2.0), ((20, np.inf), 2.0),
            ((15, 45), 2.0), ((15, 60), 2.0), ((15, 60), 1.5),
        ):  # fmt: skip
            for top in (2.0, 4.0, 5.7):
                shown = f"{view[0]}" if view[1] == np.inf else f"{view[0]}-{view[1]}"
                name = (
                    f"look at {'/'.join(map(str, looks))} (view {shown}, x{factor:g}); "
                    f"magnify under 20 to 30 (at most {top:g}x), shrink over 30"
                )
                out[name] = ladder(looks, view, factor, 20, 30, top)
    return out


def score_rules(table):
    """IoU and AP of every rule per case (held-out group or shift) and image, with the
    post-processing's sizes in the image's pixels (``post="image"``) and the network's."""
    import pandas as pd

    results = []
    for (case, image_id), rows in table.groupby(["case", "image_id"]):
        rows = rows.set_index("scale")

        def measure(s, rows=rows):
            s = snap(s, rows.index)
            return rows.loc[s, "measured"]  # the probability has the image's size

        for name, rule in rules().items():
            s = snap(rule(measure), rows.index)
            for post, suffix in (("image", ""), ("network", "_net")):
                results.append(
                    {"case": case, "image_id": image_id, "rule": name, "post": post,
                     "scale": s, "iou": rows.loc[s, "iou" + suffix],
                     "ap": rows.loc[s, "ap" + suffix]}
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

    from s2l_core.files import atomic_path, write_text
    from s2l_core.predict import load_model

    work = Path(args.work)
    dataset, _ = open_data({"dataset": args.dataset, "source": args.source, "ratio": 0.3})
    tag = "_".join(c.replace(" ", "") for c in args.cases) if args.cases else "all"
    stem = f"scalerule_{args.variant}_s{args.seed}"
    grid_csv = work / f"{stem}_{tag}.csv"
    # Measurements of earlier runs (each run's cases in a file of its own) are reused.
    earlier = sorted(work.glob(f"{stem}_*.csv"))
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
            continue
        for factor in SHRINK.get(fold, (1.0,)):
            case = f"held-out {fold}" + ("" if factor == 1.0 else f" x{factor:g}")
            cases.append((case, name, ids, factor))
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
            grid = GRID if factor <= 1.0 else [s for s in GRID if s <= 1.0]
            for r in measure_grid(model, raw, truth, grid):
                rows.append(r | {"case": case, "image_id": image_id})
        part = pd.DataFrame(rows)
        done = part if done is None else pd.concat([done, part], ignore_index=True)
        mine = part if mine is None else pd.concat([mine, part], ignore_index=True)
        with atomic_path(grid_csv) as tmp:
            mine.to_csv(tmp, index=False)
        print(f"{case}: {len(ids)} images", flush=True)
    # Images whose labels miss most of their nuclei are not scored (folds() lists them).
    scored_ids = {i for _, _, ids in folds(dataset, "fluorescence").values() for i in ids}
    done = done[done["image_id"].isin(scored_ids)]
    scored = score_rules(done)
    summary = scored.groupby(["rule", "post", "case"])[["iou", "ap"]].mean().unstack("case")
    order = [c for c, *_ in cases if c in summary["iou"].columns]
    tables = {}
    for metric in ("iou", "ap"):
        t = summary[metric][order]
        t["mean"] = t.mean(axis=1)
        t["min"] = t.drop(columns="mean").min(axis=1)
        tables[metric] = t.sort_values("mean", ascending=False).round(3).reset_index()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    text = "\n".join(
        [
            f'# Rules for `scale="auto"` ({args.variant}, seed {args.seed})',
            "",
            f"Command: `{command}`",
            "",
            "Mean over images per case; default preset without TTA; scales on the grid "
            f"{', '.join(map(str, GRID))} and, where the nuclei measure under {SMALL:g} "
            f"pixels, {', '.join(map(str, GRID_UP))}. `post`: the post-processing's sizes "
            "(min_size, smoothing, split depth) in the image's pixels or in the network's "
            "(divided by the scale). Shrunk cases (x0.5, x0.33) are the held-out group's "
            "images and labels shrunk. Images whose masks miss most of their nuclei "
            "(`bench_generalization.unscored`) are not scored.",
            "",
            "Foreground IoU:",
            "",
            tables["iou"].to_markdown(index=False),
            "",
            "Average precision (DSB):",
            "",
            tables["ap"].to_markdown(index=False),
            "",
        ]
    )
    args.output.mkdir(parents=True, exist_ok=True)
    write_text(args.output / f"autoscale_{args.variant}_s{args.seed}.md", text)
    print(text)


if __name__ == "__main__":
    main()
