"""Checks of options that several modules share, with errors that name the option."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["whole_number"]


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
