"""Scribble2Label: cell segmentation trained from scribbles.

The package holds the plumbing of the scribble2label-book: data acquisition and
preparation (:mod:`s2l_core.data`), scribble synthesis (:mod:`s2l_core.scribbles`),
and the pieces the chapters assemble into a training loop.
"""

__version__ = "0.2.0"
