"""The classical scribble baseline: a random-forest pixel classifier (ilastik style).

Trained on the same scribbles as Scribble2Label with scikit-image's
:func:`skimage.future.fit_segmenter` on multiscale intensity, edge and texture features.
The deep baselines (pCE only, full supervision) are :class:`s2l_core.train.Trainer` runs
with other settings, so every comparison goes through one API.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from skimage.feature import multiscale_basic_features
from skimage.future import fit_segmenter
from sklearn.ensemble import RandomForestClassifier

from s2l_core.checks import whole_number
from s2l_core.encoding import BACKGROUND, FOREGROUND, validate_scribble

__all__ = ["RandomForestSegmenter"]


def _network_image(image: np.ndarray, what: str) -> np.ndarray:
    """``image`` as an array if it is ``(3, H, W)``, the network's input layout."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(
            f"{what}: expected a normalised (3, H, W) image "
            f"(s2l_core.augment.normalize_image), got shape {image.shape}"
        )
    return image


class RandomForestSegmenter:
    """Random-forest pixel classifier trained from scribbles.

    Parameters
    ----------
    n_estimators, max_depth : int, optional
        Forest size; ``max_depth=None`` grows every tree to its full depth.
    sigma_min, sigma_max : float, optional
        Range of the Gaussian scales of the features.
    max_pixels_per_image : int, optional
        Scribbled pixels sampled per image and class (keeps training fast and balanced
        between images).
    seed : int, optional
        Seed of the pixel sampling and the forest.

    Raises
    ------
    ValueError
        If a count is not a whole number of at least 1 (``seed``: 0), or the scales are
        not ``0 < sigma_min <= sigma_max`` and finite.
    """

    def __init__(
        self,
        *,
        n_estimators: int = 100,
        max_depth: int | None = 12,
        sigma_min: float = 1.0,
        sigma_max: float = 16.0,
        max_pixels_per_image: int = 2000,
        seed: int = 0,
    ) -> None:
        counts = {
            "n_estimators": (n_estimators, 1), "max_depth": (max_depth, 1),
            "max_pixels_per_image": (max_pixels_per_image, 1), "seed": (seed, 0),
        }  # fmt: skip
        if max_depth is None:  # a forest of unlimited depth, as scikit-learn allows
            del counts["max_depth"]
        for name, (value, minimum) in counts.items():
            whole_number(name, value, minimum)
        if not 0 < sigma_min <= sigma_max < np.inf:  # False for NaN too
            raise ValueError(
                f"the feature scales must be 0 < sigma_min <= sigma_max and finite, got "
                f"{sigma_min} and {sigma_max}"
            )
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.max_pixels_per_image = max_pixels_per_image
        self.seed = seed
        self.classifier = RandomForestClassifier(
            n_estimators=n_estimators, max_depth=max_depth, n_jobs=-1, random_state=seed
        )
        self.fitted = False

    def features(self, image: np.ndarray) -> np.ndarray:
        """``(H, W, F)`` features of a normalised ``(3, H, W)`` image."""
        return multiscale_basic_features(
            np.moveaxis(np.asarray(image, dtype=np.float32), 0, -1),
            sigma_min=self.sigma_min,
            sigma_max=self.sigma_max,
            channel_axis=-1,
        )

    def fit(self, images: Sequence[np.ndarray], scribbles: Sequence[np.ndarray]):
        """Fit on normalised images ``(3, H, W)`` and their scribbles ``(H, W)``.

        Raises
        ------
        ValueError
            If the lists differ in length, an image is not ``(3, H, W)``, a scribble is not
            a valid scribble image of its image's ``(H, W)`` (the pair is named by its
            position), or the scribbles hold no foreground or no background pixel.
        """
        images, scribbles = list(images), list(scribbles)
        if len(images) != len(scribbles):
            raise ValueError(f"{len(images)} images but {len(scribbles)} scribble images")
        rng = np.random.default_rng(self.seed)
        feats, labels = [], []
        for k, (image, scribble) in enumerate(zip(images, scribbles, strict=True)):
            image = _network_image(image, f"image {k}")
            try:
                scribble = validate_scribble(scribble, image.shape[-2:])
            except ValueError as err:  # a wrong shape would pick the wrong pixels
                raise ValueError(f"image {k}: {err}") from None
            f = self.features(image)
            for value in (BACKGROUND, FOREGROUND):
                idx = np.flatnonzero(scribble.ravel() == value)
                if idx.size > self.max_pixels_per_image:
                    idx = rng.choice(idx, self.max_pixels_per_image, replace=False)
                feats.append(f.reshape(-1, f.shape[-1])[idx])
                labels.append(np.full(idx.size, value + 1, dtype=np.uint8))  # 1 bg, 2 fg
        x = np.concatenate(feats)[:, None, :]
        y = np.concatenate(labels)[:, None]
        if len(np.unique(y)) < 2:
            raise ValueError("the scribbles must contain both foreground and background pixels")
        fit_segmenter(y, x, self.classifier)
        self.fitted = True
        return self

    def predict_proba(self, image: np.ndarray) -> np.ndarray:
        """Foreground probability ``(H, W)`` ``float32`` of a normalised image."""
        if not self.fitted:
            raise RuntimeError("fit the random forest before predicting")
        f = self.features(_network_image(image, "predict_proba"))
        proba = self.classifier.predict_proba(f.reshape(-1, f.shape[-1]))
        fg_column = list(self.classifier.classes_).index(FOREGROUND + 1)
        return proba[:, fg_column].reshape(f.shape[:2]).astype(np.float32)
