"""The checkpoint format: write, compress and load the files that training produces.

Two kinds of file share one format (:data:`CHECKPOINT_FORMAT`), both loaded with
``torch.load(weights_only=True)`` so that a file from elsewhere cannot run code:

- ``kind="model"`` (:func:`write_model_checkpoint`): the selected weights, the network's
  configuration, the training configuration and metadata (``extra``, e.g. the
  post-processing preset), weights stored in ``float32``, ``float16`` or ``int8``;
- ``kind="training"`` (written by the training loop): everything needed to resume.

Inference needs only this module, never the training loop.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from s2l_core.files import atomic_path, remove_stale

__all__ = [
    "CHECKPOINT_FORMAT",
    "PRECISIONS",
    "compress_weights",
    "load_checkpoint",
    "write_model_checkpoint",
]

#: Version of the checkpoint layout; files of another version are refused.
CHECKPOINT_FORMAT = 1
#: How :func:`write_model_checkpoint` may store the weights.
PRECISIONS = ("float32", "float16", "int8")


def write_model_checkpoint(
    path: str | os.PathLike,
    *,
    model_config: dict,
    weights: dict[str, torch.Tensor],
    config: dict,
    selected: dict,
    extra: dict | None = None,
    precision: str = "float32",
) -> Path:
    """Write an inference checkpoint, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Where to write it.
    model_config : dict
        The network's configuration (:func:`s2l_core.model.from_config` rebuilds it).
    weights : dict of str to torch.Tensor
        The network's ``state_dict``.
    config : dict
        The training configuration, as plain values.
    selected : dict
        Which weights these are, e.g. ``{"epoch": 29, "how": "last epoch"}``.
    extra : dict, optional
        Metadata kept under ``"extra"``: plain values (str, numbers, bools, None,
        lists and dicts of them; NumPy scalars are converted), so that the file loads
        with ``weights_only=True``.
    precision : {"float32", "float16", "int8"}, optional
        How the weights are stored (:func:`compress_weights`); :func:`load_checkpoint`
        turns them back into ``float32``.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    extra = _plain_metadata(extra or {})
    model, scales = compress_weights({k: v.detach().cpu() for k, v in weights.items()}, precision)
    state = {
        "format": CHECKPOINT_FORMAT,
        "kind": "model",
        "model_config": model_config,
        "model": model,
        "precision": precision,
        "config": config,
        "selected": selected,
        "extra": extra,
    }
    if scales:
        state["scales"] = scales
    path = Path(path)
    remove_stale(path)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def _plain_metadata(extra: dict) -> dict:
    """``extra`` with NumPy scalars made Python ones; an error for anything not plain."""

    def plain(value):
        if isinstance(value, np.generic):
            return value.item()
        raise TypeError(
            f"checkpoint metadata must hold plain values (str, numbers, lists, dicts), "
            f"got {type(value).__name__}: {value!r}"
        )

    if not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
    return json.loads(json.dumps(extra, default=plain))


def compress_weights(
    weights: dict[str, torch.Tensor], precision: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Store a state dict's floating-point tensors in a smaller type.

    Parameters
    ----------
    weights : dict of str to torch.Tensor
        A model's ``state_dict`` (on the CPU).
    precision : {"float32", "float16", "int8"}
        ``"int8"``: every floating tensor of two or more dimensions (weight matrices and
        convolution kernels) becomes ``int8`` with a symmetric ``float32`` scale per
        output channel; the others (biases, norm statistics) become ``float16``.

    Returns
    -------
    weights : dict of str to torch.Tensor
        The stored tensors; integer tensors (counters) are unchanged.
    scales : dict of str to torch.Tensor
        ``(C_out,)`` ``float32`` scale of every ``int8`` tensor (empty unless ``"int8"``).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    out, scales = {}, {}
    for name, tensor in weights.items():
        if not tensor.is_floating_point() or precision == "float32":
            out[name] = tensor
        elif precision == "int8" and tensor.ndim >= 2:
            flat = tensor.float().reshape(tensor.shape[0], -1)
            scale = flat.abs().amax(dim=1).clamp_min(1e-12) / 127.0
            q = torch.round(flat / scale[:, None]).clamp_(-127, 127).to(torch.int8)
            out[name], scales[name] = q.reshape(tensor.shape), scale
        else:
            out[name] = tensor.half()
    return out, scales


def _expand_weights(state: dict) -> None:
    """Undo :func:`compress_weights` in a loaded checkpoint: every float tensor to float32."""
    scales = state.pop("scales", None) or {}
    model = state.get("model")
    if not isinstance(model, dict):
        return
    for name, tensor in model.items():
        if name in scales:
            scale = scales[name].float().reshape(-1, *([1] * (tensor.ndim - 1)))
            model[name] = tensor.float() * scale
        elif tensor.is_floating_point() and tensor.dtype != torch.float32:
            model[name] = tensor.float()


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint safely (``weights_only=True``) and check its format.

    Parameters
    ----------
    path : str or os.PathLike
        A file written by :func:`write_model_checkpoint` or by the training loop.
    map_location : str or torch.device, optional
        Where to put the tensors.

    Returns
    -------
    dict
        The checkpoint, with ``"format"``, ``"model_config"`` (a dict) and ``"model"`` (a
        dict of tensors) checked. Weights stored in ``float16`` or ``int8`` are returned
        as ``float32``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If ``path`` is a folder; if the file is not readable as a PyTorch file
        (truncated, damaged); if it holds Python objects other than tensors and plain
        values (it is then not opened further: such a file can run code when loaded); or
        if it is not a checkpoint of this package or of another format version.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not a checkpoint file: give the .pt file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err) or "Unsupported global" in str(err):
            raise ValueError(
                f"{path} holds Python objects besides tensors and plain values: it is not "
                "a plain checkpoint of this package and will not be loaded (loading such a "
                "file can run code)"
            ) from None
        raise ValueError(f"{path} is not a readable checkpoint: {_first_line(err)}") from None
    except Exception as err:  # torch raises many kinds for a damaged file
        raise ValueError(
            f"{path} is not a readable checkpoint (truncated, damaged or not a PyTorch "
            f"file): {_first_line(err)}"
        ) from None
    if not isinstance(state, dict) or "format" not in state or "model_config" not in state:
        raise ValueError(f"{path} is not a Scribble2Label checkpoint of this package")
    if state["format"] != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} has checkpoint format {state['format']!r}; this version reads format "
            f"{CHECKPOINT_FORMAT}"
        )
    if not isinstance(state["model_config"], dict):
        raise ValueError(
            f"{path} is damaged: its model_config is {type(state['model_config']).__name__}, "
            "not the network's configuration (a dict)"
        )
    weights = state.get("model")
    if not isinstance(weights, dict) or not all(
        isinstance(v, torch.Tensor) for v in weights.values()
    ):
        raise ValueError(f"{path} is damaged: it holds no network weights ('model')")
    _expand_weights(state)
    return state


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
