"""Scoring a model on a whole split: one table row per image, and summaries per size.

The last step of the data flow. It predicts every image whole, turns the foreground
into nuclei and scores them with :func:`s2l_core.metrics.evaluate_image`, so the quality
benchmark, the reference checkpoint's metrics and the evaluation chapter all score in
exactly one way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from s2l_core.augment import normalize_image
from s2l_core.metrics import evaluate_image
from s2l_core.predict import Preset, labels_of

__all__ = ["PLAIN", "SCORES", "dataset_images", "score_images", "summarize_by"]

#: The per-image scores of every table, in their order of display.
SCORES: tuple[str, ...] = ("iou", "dice", "ap", "f1", "aji", "original_mdice", "object_dice")


def dataset_images(dataset, ids: Sequence[str]) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yield ``(image_id, normalised image, truth labels)`` of prepared images, one at a time.

    Parameters
    ----------
    dataset : s2l_core.data.PreparedDataset
        The prepared dataset.
    ids : sequence of str
        Image ids, e.g. ``dataset.ids("fluorescence", "test")``.

    Yields
    ------
    tuple
        The id, the ``(3, H, W)`` ``float32`` network input and the ``(H, W)`` instance
        labels.
    """
    for image_id in ids:
        yield image_id, normalize_image(dataset.image(image_id)), dataset.labels(image_id)


#: The post-processing that scores a network's probability as it is: threshold 0.5 (the
#: original Scribble2Label's argmax), the watershed at split depth 2, no hysteresis, no
#: smoothing, objects of 16 pixels or more, scale 1, no test-time augmentation.
PLAIN = Preset(
    threshold=0.5, split_depth=2.0, min_peak=0.0, min_size=16, smooth=0.0, scale=1.0,
    tta=False,
)  # fmt: skip


def score_images(
    predict: Callable[[np.ndarray], np.ndarray],
    images: Iterable[tuple[str, np.ndarray, np.ndarray]],
    *,
    instances: Sequence[str] = ("watershed",),
    preset: Preset = PLAIN,
    labels_out: dict | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Predict and score every image.

    Parameters
    ----------
    predict : callable
        ``predict(image) -> prob``: a ``(3, H, W)`` ``float32`` normalised image to its
        ``(H, W)`` foreground probability (e.g. ``lambda x: predict_foreground(model, x)``,
        or a random forest's ``predict_proba``); or ``-> (prob, scale)``, as
        :meth:`s2l_core.predict.Preset.probability` returns, when the network saw the
        image at another scale (the preset's sizes are then read in its pixels,
        :func:`s2l_core.predict.labels_of`).
    images : iterable of (str, numpy.ndarray, numpy.ndarray)
        ``(image_id, image, truth)`` triples, e.g. from :func:`dataset_images` or made
        from :class:`s2l_core.samples.TrainSample` objects.
    instances : sequence of {"watershed", "components"}, optional
        How to split the foreground into nuclei; one row per image and method.
    preset : Preset, optional
        How the probability becomes labels (``threshold``, ``min_peak``, ``min_size``,
        ``smooth``; its ``method`` is replaced by each of ``instances``; ``scale`` and
        ``tta`` are ``predict``'s business). Default :data:`PLAIN`.
    labels_out : dict, optional
        If given, receives ``labels_out[image_id][method]``: the predicted instance labels.
    progress : bool, optional
        Show a progress bar.

    Returns
    -------
    pandas.DataFrame
        One row per image and instance method: ``image_id``, ``size`` (``"HxW"``),
        ``instances``, ``predict_s`` (seconds of inference) and the :data:`SCORES`.

    Raises
    ------
    ValueError
        If ``instances`` is empty or a prediction's shape differs from its truth's.
    """
    if not instances:
        raise ValueError("instances must name at least one method ('watershed', 'components')")
    rows = []
    for image_id, image, truth in tqdm(images, desc="scoring", disable=not progress):
        start = time.perf_counter()
        prob, scale = predict(image), 1.0
        if isinstance(prob, tuple):
            prob, scale = prob
        prob = np.asarray(prob)
        seconds = time.perf_counter() - start
        if prob.shape != truth.shape:
            raise ValueError(
                f"{image_id}: the prediction has shape {prob.shape} but the truth has {truth.shape}"
            )
        for method in instances:
            labels = labels_of(prob, preset.but(method=method), scale=scale)
            scores = evaluate_image(labels, truth)
            rows.append(
                {
                    "image_id": image_id,
                    "size": f"{truth.shape[0]}x{truth.shape[1]}",
                    "instances": method,
                    "predict_s": seconds,
                }
                | {k: float(scores[k]) for k in SCORES}
            )
            if labels_out is not None:
                labels_out.setdefault(image_id, {})[method] = labels
    return pd.DataFrame(rows, columns=["image_id", "size", "instances", "predict_s", *SCORES])


def summarize_by(scores: pd.DataFrame, *keys: str) -> pd.DataFrame:
    """Mean of every score per group, with the number of images in each.

    Parameters
    ----------
    scores : pandas.DataFrame
        Rows from :func:`score_images` (possibly several methods' tables concatenated).
    *keys : str
        Columns to group by, e.g. ``"method"`` or ``"size", "method"``; none: one row,
        the mean over all images.

    Returns
    -------
    pandas.DataFrame
        One row per group: the :data:`SCORES` means and ``images``.
    """
    if scores.empty:
        raise ValueError("no scores to summarize")
    cols = list(SCORES)
    if not keys:
        return scores[cols].mean().to_frame("all").T.assign(images=len(scores))
    grouped = scores.groupby(list(keys))
    return grouped[cols].mean().assign(images=grouped.size())
