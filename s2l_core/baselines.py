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

from s2l_core.scribbles import BACKGROUND, FOREGROUND

__all__ = ["RandomForestSegmenter"]


class RandomForestSegmenter:
    """Random-forest pixel classifier trained from scribbles.

    Parameters
    ----------
    n_estimators, max_depth : int, optional
        Forest size.
    sigma_min, sigma_max : float, optional
        Range of the Gaussian scales of the features.
    max_pixels_per_image : int, optional
        Scribbled pixels sampled per image and class (keeps training fast and balanced
        between images).
    seed : int, optional
        Seed of the pixel sampling and the forest.
    """

    def __init__(
        self,
        *,
        n_estimators: int = 100,
        max_depth: int = 12,
        sigma_min: float = 1.0,
        sigma_max: float = 16.0,
        max_pixels_per_image: int = 2000,
        seed: int = 0,
    ) -> None:
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
        """Fit on normalised images ``(3, H, W)`` and their scribbles ``(H, W)``."""
        rng = np.random.default_rng(self.seed)
        feats, labels = [], []
        for image, scribble in zip(images, scribbles, strict=True):
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
        f = self.features(image)
        proba = self.classifier.predict_proba(f.reshape(-1, f.shape[-1]))
        fg_column = list(self.classifier.classes_).index(FOREGROUND + 1)
        return proba[:, fg_column].reshape(f.shape[:2]).astype(np.float32)
