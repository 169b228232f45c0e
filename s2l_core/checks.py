"""Checks of the options of the package, each with an error that names the option.

The configuration objects (:class:`s2l_core.config.TrainConfig`,
:class:`s2l_core.predict.Preset`), the public entry points and the command line's
argument types call these, so that a bad option is refused before any work, in one
wording wherever it is given.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "SCALE_RANGE",
    "check_alpha",
    "check_method",
    "check_min_peak",
    "check_ratio",
    "check_scale",
    "check_smooth",
    "check_tau",
    "check_threshold",
    "positive_pixels",
    "whole_number",
]


def whole_number(name: str, value: Any, minimum: int, *, unit: str = "") -> int:
    """Check that an option is a whole number of at least ``minimum``.

    Parameters
    ----------
    name : str
        The option's name, for the error.
    value : Any
        The option as given; a Python or NumPy integer (``bool`` is not a number here).
    minimum : int
        The smallest value allowed.
    unit : str, optional
        What the number counts, for the error (e.g. ``"pixels"``).

    Returns
    -------
    int
        ``value`` as a plain ``int`` (JSON-safe).

    Raises
    ------
    ValueError
        ``"<name> must be a whole number [of <unit>] >= <minimum>, got <value>"``.
    """
    whole = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not (whole and value >= minimum):
        counted = f" of {unit}" if unit else ""
        raise ValueError(f"{name} must be a whole number{counted} >= {minimum}, got {value!r}")
    return int(value)


def check_min_peak(min_peak: float | None) -> float | None:
    """Check a ``min_peak`` option (:func:`foreground_to_instances`): ``None`` or a
    probability in [0, 1]; returned as given.

    Raises
    ------
    ValueError
        If ``min_peak`` is neither ``None`` nor in [0, 1].
    """
    if min_peak is not None and not (0.0 <= min_peak <= 1.0):
        raise ValueError(f"min_peak must be a probability in [0, 1] or None, got {min_peak}")
    return min_peak


def check_threshold(threshold: float) -> float:
    """Check a foreground ``threshold`` option: a probability strictly between 0 and 1.

    Parameters
    ----------
    threshold : float
        The option as given.

    Returns
    -------
    float
        The threshold as a float.

    Raises
    ------
    ValueError
        If ``threshold`` is not a number in (0, 1): at 0 or below every pixel would be
        foreground, at 1 or above none, and NaN leaves none without saying so.
    """
    if isinstance(threshold, bool) or not isinstance(
        threshold, (int, float, np.integer, np.floating)
    ):
        raise ValueError(f"threshold must be a probability in (0, 1), got {threshold!r}")
    if not 0.0 < threshold < 1.0:  # False for NaN too
        raise ValueError(f"threshold must be a probability in (0, 1), got {threshold}")
    return float(threshold)


def positive_pixels(name: str, value: Any) -> float:
    """Check an option that is a size in pixels (a split depth, a diameter): a positive
    finite number, returned as a float.

    Raises
    ------
    ValueError
        If ``value`` is not a number (``True`` is not one), or is at most 0, infinite or
        NaN.
    """
    number = isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
    if not (number and 0 < value < np.inf):  # False for NaN too
        raise ValueError(f"{name} must be a positive finite number of pixels, got {value!r}")
    return float(value)


def check_smooth(smooth: float) -> float:
    """Check a ``smooth`` option (:func:`foreground_to_instances`): a Gaussian's standard
    deviation in pixels, finite and at least 0.

    Raises
    ------
    ValueError
        If ``smooth`` is not a number, or negative, infinite or NaN.
    """
    number = isinstance(smooth, (int, float, np.integer, np.floating))
    if isinstance(smooth, bool) or not number or not 0.0 <= smooth < np.inf:
        raise ValueError(f"smooth must be a finite number of pixels >= 0, got {smooth!r}")
    return float(smooth)


def check_method(method: str) -> str:
    """Check an instance ``method`` option (:func:`foreground_to_instances`).

    Raises
    ------
    ValueError
        If ``method`` is neither ``"watershed"`` nor ``"components"``.
    """
    if method not in ("watershed", "components"):
        raise ValueError(f"method must be 'watershed' or 'components', got {method!r}")
    return method


#: The range of a fixed ``scale``: beyond it an image becomes too large to hold, or too
#: small to hold any nucleus.
SCALE_RANGE = (1 / 16, 16.0)


def check_scale(scale: float | str) -> float | str:
    """Check a ``scale`` option: ``"auto"`` or a number in :data:`SCALE_RANGE`.

    Parameters
    ----------
    scale : float or str
        The option as given.

    Returns
    -------
    float or str
        ``"auto"``, or the scale as a float.

    Raises
    ------
    ValueError
        If ``scale`` is another string, not a number, or outside
        :data:`SCALE_RANGE` (1/16 to 16).
    """
    low, high = SCALE_RANGE
    wanted = f"a number from {low:g} to {high:g} or 'auto'"
    if isinstance(scale, str):
        if scale != "auto":
            raise ValueError(f"scale must be {wanted}, got {scale!r}")
        return scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise ValueError(f"scale must be {wanted}, got {scale!r}")
    if not (np.isfinite(scale) and low <= scale <= high):
        raise ValueError(
            f"scale must be {wanted}, got {scale:g}: it magnifies every image by that "
            "factor (16 makes a 1000 x 1000 image 16000 x 16000)"
        )
    return float(scale)


def check_tau(tau: float) -> float:
    """Validate the confidence threshold ``tau`` and return it as a float.

    Parameters
    ----------
    tau : float
        Confidence threshold; must lie in ``(0.5, 1]``. With ``tau <= 0.5`` a pixel
        could be confident foreground and background at once.

    Returns
    -------
    float
        ``tau`` as a Python float.
    """
    tau = _real_number("tau", tau)
    if not (0.5 < tau <= 1.0):
        raise ValueError(f"tau must lie in (0.5, 1], got {tau}")
    return tau


def _real_number(name: str, value: Any) -> float:
    """``value`` as a float; TypeError naming ``name`` unless a Python int or float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_alpha(alpha: float) -> float:
    """Check the EMA weight ``alpha`` of new predictions: a real number in (0, 1].

    Raises
    ------
    TypeError
        If ``alpha`` is not a real number.
    ValueError
        If it lies outside (0, 1].
    """
    alpha = _real_number("alpha", alpha)
    if not (0.0 < alpha <= 1.0):
        raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
    return alpha


def check_ratio(ratio: float) -> float:
    """Check a scribble ratio: the fraction of foreground pieces kept, in (0, 1]."""
    ratio = float(ratio)
    if not 0 < ratio <= 1:
        raise ValueError(f"scribble ratio must lie in (0, 1], got {ratio}")
    return ratio
