"""The Scribble2Label training loop: warm-up on scribbles, EMA store, confident pseudo-labels.

One epoch (after Lee & Jeong, MICCAI 2020, and the original code's defaults):

1. one augmented crop per training image (or ``samples_per_epoch`` crops), in batches;
   the loss is the partial cross-entropy on scribbles, plus ``lam`` times the
   cross-entropy on confident pseudo-labels once warm-up is over;
2. validation, when due;
3. when due (every ``ema_every`` epochs from epoch ``ema_start``, warm-up included),
   every whole training image is predicted in eval mode and folded into its EMA map.

Everything needed to continue exactly is checkpointed — model, optimiser, scheduler, EMA
store, random number generator states, epoch, history and configuration — so a run that
is interrupted and resumed gives the same result as one run straight through (on the CPU).

The same :class:`Trainer` trains the baselines, so comparisons are like for like:
``use_pseudo=False`` is pCE only, and :func:`load_samples` with ``full_masks=True`` turns
the full masks into "scribbles" that cover every pixel (full supervision).
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from s2l_core.augment import AugmentConfig, normalize_image, random_crops, select_channel
from s2l_core.checkpoint import (
    CHECKPOINT_FORMAT,
    PRECISIONS,
    compress_weights,
    load_checkpoint,
    write_model_checkpoint,
)
from s2l_core.checks import whole_number
from s2l_core.files import atomic_path, remove_stale
from s2l_core.infer import autocast_context, predict_foreground
from s2l_core.losses import (
    affinity_loss,
    check_tau,
    dice_loss,
    pseudo_label_targets,
    scribble2label_loss,
)
from s2l_core.metrics import foreground_iou
from s2l_core.model import from_config, parameter_groups
from s2l_core.pseudo import EMAStore, ema_due, pseudo_label_accuracy
from s2l_core.runtime import cpu_bf16_native, pick_device, set_seed
from s2l_core.scribbles import BACKGROUND, FOREGROUND, UNLABELLED, validate_scribble

__all__ = [
    "CHECKPOINT_FORMAT",
    "ILLUMINATION",
    "PRECISIONS",
    "PROFILES",
    "TrainConfig",
    "TrainSample",
    "Trainer",
    "compress_weights",
    "load_checkpoint",
    "load_folder_samples",
    "load_samples",
]

SELECTIONS = ("last", "val_scribble", "val_iou_full_masks")


@dataclass
class TrainSample:
    """One training (or validation) image.

    Attributes
    ----------
    image_id : str
        A unique name.
    image : numpy.ndarray
        ``(3, H, W)`` ``float32`` from :func:`s2l_core.augment.normalize_image`.
    scribble : numpy.ndarray
        ``(H, W)`` ``uint8``: 0 background, 1 foreground, 250 unlabelled.
    labels : numpy.ndarray or None
        ``(H, W)`` full instance labels, if known: used only for reporting (pseudo-label
        accuracy, validation IoU), never for training unless the samples were made with
        ``full_masks=True``.
    """

    image_id: str
    image: np.ndarray
    scribble: np.ndarray
    labels: np.ndarray | None = None

    @classmethod
    def from_arrays(
        cls,
        image_id: str,
        image: np.ndarray,
        scribble: np.ndarray,
        labels: np.ndarray | None = None,
    ) -> TrainSample:
        """Build a sample from a raw image of any supported kind (normalised here).

        Raises
        ------
        ValueError
            If the image is of an unsupported kind, the scribble image is not a valid one
            of the image's ``(H, W)``, or ``labels`` is not an ``(H, W)`` integer or
            boolean image (which would only fail at validation, epochs later).
        """
        x = normalize_image(image)  # first: an unsupported image is the error to report
        scribble = validate_scribble(scribble, shape=x.shape[1:])
        if labels is not None:
            labels = np.asarray(labels)
            integer = labels.dtype == bool or np.issubdtype(labels.dtype, np.integer)
            if labels.shape != x.shape[1:] or not integer:
                raise ValueError(
                    f"{image_id}: labels must be an integer (or boolean) image of the "
                    f"image's shape {x.shape[1:]}, got {labels.dtype} {labels.shape}"
                )
        return cls(image_id, x, scribble, labels)


def load_samples(
    dataset,
    ids: Sequence[str],
    scribble_set=None,
    ratio: float = 0.3,
    *,
    full_masks: bool = False,
    with_labels: bool = True,
) -> list[TrainSample]:
    """Load prepared BBBC038 images with their scribbles as training samples.

    Parameters
    ----------
    dataset : s2l_core.data.PreparedDataset
        The prepared dataset.
    ids : sequence of str
        Image ids (e.g. ``dataset.ids("fluorescence", "train")``).
    scribble_set : s2l_core.scribbles.ScribbleSet, optional
        Where the scribbles come from; required unless ``full_masks``.
    ratio : float, optional
        Scribble ratio.
    full_masks : bool, optional
        Use the full masks as labels on every pixel (the full-supervision baseline).
    with_labels : bool, optional
        Keep the full labels for reporting.

    Returns
    -------
    list of TrainSample
    """
    if scribble_set is None and not full_masks:
        raise ValueError("scribble_set is required unless full_masks=True")
    samples = []
    for image_id in ids:
        labels = dataset.labels(image_id)
        if full_masks:
            scribble = np.where(labels > 0, FOREGROUND, BACKGROUND).astype(np.uint8)
        else:
            scribble = scribble_set.scribble(image_id, ratio)
        samples.append(
            TrainSample(
                image_id,
                normalize_image(dataset.image(image_id)),
                scribble,
                labels if with_labels else None,
            )
        )
    return samples


def load_folder_samples(
    images_dir: str | os.PathLike,
    scribbles_dir: str | os.PathLike,
    *,
    scribble_format: str = "s2l",
    channel: int | None = None,
) -> list[TrainSample]:
    """Load a user's images with their scribbles (same file stem) as training samples.

    Parameters
    ----------
    images_dir : str or os.PathLike
        Images of any supported kind (PNG, TIFF, JPEG; grey, RGB, RGBA; 8/16-bit).
    scribbles_dir : str or os.PathLike
        One scribble image per annotated image, named ``<image stem>.png`` (or
        ``.tif``). Images without a scribble file, and scribble files that mark no
        pixel, are skipped and listed on stderr.
    scribble_format : {"s2l", "napari"}, optional
        ``"s2l"``: 0 background, 1 foreground, 250 unlabelled; ``"napari"``: napari or
        ilastik labels, 0 unlabelled, 1 background, 2 foreground.
    channel : int, optional
        Take this channel of multi-channel images
        (:func:`s2l_core.augment.select_channel`), e.g. the nuclear stain.

    Returns
    -------
    list of TrainSample

    Raises
    ------
    FileNotFoundError, ValueError
        Missing folders, no annotated image, unreadable files or scribbles that do not
        fit their image (the message names the file).
    """
    from s2l_core.files import IMAGE_SUFFIXES, read_image
    from s2l_core.scribbles import from_napari

    if scribble_format not in ("s2l", "napari"):
        raise ValueError(f"scribble_format must be 's2l' or 'napari', got {scribble_format!r}")
    images_dir, scribbles_dir = Path(images_dir), Path(scribbles_dir)
    for folder in (images_dir, scribbles_dir):
        if not folder.is_dir():
            raise FileNotFoundError(f"folder not found: {folder}")
    samples, unscribbled, blank = [], [], []
    for path in sorted(images_dir.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
            continue
        candidates = [scribbles_dir / f"{path.stem}{s}" for s in (".png", ".tif", ".tiff")]
        found = [c for c in candidates if c.is_file()]
        if not found:
            unscribbled.append(path.name)
            continue
        image = read_image(path)
        raw = read_image(found[0])
        try:
            # from_arrays checks the image's kind before the scribbles' shape.
            scribble = from_napari(raw) if scribble_format == "napari" else raw
            sample = TrainSample.from_arrays(path.stem, select_channel(image, channel), scribble)
        except ValueError as err:  # the image's kind or the scribbles: name both files
            raise ValueError(f"{path} (scribbles {found[0].name}): {err}") from err
        if (sample.scribble == UNLABELLED).all():
            blank.append(found[0].name)
        else:
            samples.append(sample)
    for names, why in (
        (unscribbled, f"have no scribble file in {scribbles_dir}"),
        (blank, "are scribble files that mark no pixel"),
    ):
        if names and samples:
            shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
            print(f"skipped {len(names)} image(s) that {why}: {shown}", file=sys.stderr)
    if not samples and blank:
        raise ValueError(
            f"every scribble file in {scribbles_dir} leaves all pixels unlabelled "
            f"({', '.join(blank[:5])}); draw strokes on some nuclei and on the background"
        )
    if not samples:
        raise ValueError(
            f"no image in {images_dir} has a scribble file (same name, .png/.tif) in "
            f"{scribbles_dir}"
        )
    return samples


def _check_scribbled(samples: Sequence[TrainSample]) -> None:
    """Refuse training samples whose scribbles cannot teach anything: the loss on
    scribbles needs foreground and background pixels somewhere in the set."""
    fg = sum(int(np.count_nonzero(s.scribble == FOREGROUND)) for s in samples)
    bg = sum(int(np.count_nonzero(s.scribble == BACKGROUND)) for s in samples)
    if fg and bg:
        return
    missing = " and ".join(
        name for name, n in (("foreground (1)", fg), ("background (0)", bg)) if not n
    )
    raise ValueError(
        f"the scribbles of the {len(samples)} training image(s) mark no {missing} pixel, "
        "so the network cannot learn to tell nuclei from background; draw strokes on "
        "some nuclei and on the background around them"
    )


@dataclass
class TrainConfig:
    """Every setting of a training run (defaults: the original implementation's).

    Attributes
    ----------
    epochs : int
        Epochs to train.
    batch_size : int
        Crops per batch.
    samples_per_epoch : int or None
        Crops per epoch; ``None`` is one per training image (the original). Set it for
        small datasets, where an epoch of a few crops is too short.
    warmup_epochs : int
        Epochs of pCE only before pseudo-labels are used.
    ema_every, ema_start : int
        EMA update schedule: after epoch ``ema_start`` and every ``ema_every`` epochs
        (0-based epochs; see :func:`s2l_core.pseudo.ema_due`).
    alpha, tau, lam : float
        EMA weight, confidence threshold and pseudo-label loss weight.
    ema_start_value : {"first", "zero"}
        How the EMA store starts (:class:`s2l_core.pseudo.EMAStore` ``start``):
        ``"zero"`` as the original, which needs about 8 EMA updates before a foreground
        pixel can be confident and so suits only long warm-ups; ``"first"`` (default)
        starts from the first prediction.
    use_pseudo : bool
        ``False`` trains on scribbles only (the pCE baseline).
    affinity, affinity_sigma : float
        Weight of the local affinity regulariser
        (:func:`s2l_core.losses.affinity_loss`, an extension, not in the original; ``0``
        is off) and its intensity scale.
    dice : float
        Weight of a soft Dice term on the labelled pixels, scribbles and pseudo-labels
        together (:func:`s2l_core.losses.dice_loss`, an extension; ``0`` is off).
    optimizer : {"radam", "adamw"}
        RAdam (the original's; its variance rectification warms the step size up over
        the first few hundred iterations) or AdamW (faster start for short budgets).
    lr_encoder, lr_decoder, weight_decay : float
        Learning rates and decoupled weight decay.
    t0, t_mult, eta_min : float
        Cosine annealing with warm restarts, stepped every iteration.
    freeze_head : bool
        Leave the final output layer at its initialisation, as the original code did by
        mistake (it put only the encoder and decoder into the optimiser).
    val_every : int
        Validate every this many epochs (and after the last); 0 never.
    select : str
        Which weights :meth:`Trainer.best_state` returns: ``"last"`` (default: needs no
        full masks), ``"val_scribble"`` (lowest scribble loss on validation images: needs
        only scribbles) or ``"val_iou_full_masks"`` (highest validation IoU on *full*
        masks, as the original; labels a scribble-only user does not have).
    seed : int
        Seed of initialisation, crops and augmentation.
    amp, channels_last : bool
        Mixed precision on CUDA and channels-last memory format.
    cpu_bf16 : bool
        bfloat16 autocast when training on a CPU that computes bfloat16 natively
        (AVX512-BF16 or AMX, :func:`s2l_core.runtime.cpu_bf16_native`); elsewhere
        float32, with a note. On such a CPU the training step runs about 1.7 times as
        fast as in float32 (``benchmarks/bench_model.py``) and a whole ``cpu``-profile
        run about 1.5 times, at the same quality. Off by default.
    model : dict
        Keyword arguments of :class:`s2l_core.model.UNet`.
    augment : AugmentConfig
        Augmentation.
    """

    epochs: int = 200
    batch_size: int = 16
    samples_per_epoch: int | None = None
    warmup_epochs: int = 100
    ema_every: int = 5
    ema_start: int = 4
    alpha: float = 0.2
    ema_start_value: str = "first"
    tau: float = 0.8
    lam: float = 0.5
    use_pseudo: bool = True
    affinity: float = 0.0
    affinity_sigma: float = 0.1
    dice: float = 0.0
    optimizer: str = "radam"
    lr_encoder: float = 3e-4
    lr_decoder: float = 3e-3
    weight_decay: float = 5e-5
    t0: int = 2
    t_mult: int = 2
    eta_min: float = 1e-6
    freeze_head: bool = False
    val_every: int = 5
    select: str = "last"
    seed: int = 0
    amp: bool = True
    channels_last: bool = True
    cpu_bf16: bool = False
    model: dict = field(default_factory=dict)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.optimizer not in ("radam", "adamw"):
            raise ValueError(f"optimizer must be 'radam' or 'adamw', got {self.optimizer!r}")
        if self.select not in SELECTIONS:
            raise ValueError(f"select must be one of {SELECTIONS}, got {self.select!r}")
        if not self.affinity_sigma > 0:  # False for NaN too
            raise ValueError(f"affinity_sigma must be > 0, got {self.affinity_sigma}")
        self._check_schedule()
        if isinstance(self.augment, dict):
            self.augment = AugmentConfig.from_dict(self.augment)

    def _check_schedule(self) -> None:
        """Refuse counts and rates that would fail only later in a run (``tau`` after
        the first batch, ``ema_every`` after the first epoch) or train silently wrong (no
        batch in an epoch); whole numbers are stored as plain ``int``."""
        whole = {
            "epochs": 0, "batch_size": 1, "warmup_epochs": 0, "ema_every": 1, "ema_start": 0,
            "val_every": 0, "t0": 1, "t_mult": 1, "seed": 0,
        }  # fmt: skip
        if self.samples_per_epoch is not None:
            whole["samples_per_epoch"] = 1
        for name, minimum in whole.items():
            # NumPy integers become plain ints (JSON-safe).
            setattr(self, name, whole_number(name, getattr(self, name), minimum))
        rates = {  # name: (lowest value allowed, whether it may be equalled, upper limit)
            "alpha": (0.0, False, 1.0), "lam": (0.0, True, math.inf),
            "lr_encoder": (0.0, False, math.inf), "lr_decoder": (0.0, False, math.inf),
            "weight_decay": (0.0, True, math.inf), "eta_min": (0.0, True, math.inf),
            "affinity": (0.0, True, math.inf), "dice": (0.0, True, math.inf),
        }  # fmt: skip
        for name, (low, closed, high) in rates.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
                raise ValueError(f"{name} must be a number, got {value!r}")
            above = value >= low if closed else value > low
            if not (above and value <= high and math.isfinite(value)):
                bound = f"{'>=' if closed else '>'} {low:g}"
                limit = f" and <= {high:g}" if math.isfinite(high) else ""
                raise ValueError(f"{name} must be a finite number {bound}{limit}, got {value}")
        try:
            check_tau(self.tau)
        except TypeError as err:
            raise ValueError(str(err)) from None
        if self.ema_start_value not in ("first", "zero"):
            raise ValueError(
                f"ema_start_value must be 'first' or 'zero', got {self.ema_start_value!r}"
            )

    def to_dict(self) -> dict:
        """Plain-type dict (JSON and ``torch.load(weights_only=True)`` safe)."""
        d = asdict(self)
        d["augment"] = self.augment.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        return cls(**d)

    @classmethod
    def profile(cls, name: str, **overrides: Any) -> TrainConfig:
        """A named budget: ``smoke``, ``cpu`` or ``full`` (see :data:`PROFILES`)."""
        if name not in PROFILES:
            raise ValueError(f"unknown profile {name!r}; choose from {sorted(PROFILES)}")
        return replace(PROFILES[name], **overrides)


#: Amplitude range of the illumination-field augmentation in the ``cpu`` and ``full``
#: profiles (:class:`s2l_core.augment.AugmentConfig`). Measured on the fluorescence split
#: with the ``cpu`` profile: test IoU 0.842 → 0.852, AP 0.531 → 0.557.
ILLUMINATION: tuple[float, float] = (-0.2, 0.5)

#: Named budgets. ``full`` is the paper's schedule (GPU). ``cpu`` fits a 2-core CPU in
#: under half an hour on the fluorescence training split (328 images): 48 epochs of 21
#: batches, so that the last cosine cycle (iterations 510-1022) ends with the run, and
#: AdamW, whose step size is not held back over the first few hundred iterations as
#: RAdam's is. Both add smooth illumination fields to half of the crops. ``smoke`` runs
#: in seconds.
PROFILES: dict[str, TrainConfig] = {
    "smoke": TrainConfig(
        epochs=3, batch_size=4, samples_per_epoch=8, warmup_epochs=1, ema_every=1,
        ema_start=0, val_every=3, augment=AugmentConfig(crop_size=128),
    ),
    "cpu": TrainConfig(
        epochs=48, batch_size=16, warmup_epochs=15, ema_every=3, ema_start=2, val_every=6,
        optimizer="adamw", lr_encoder=1e-3, lr_decoder=3e-3,
        augment=AugmentConfig(illumination=ILLUMINATION),
    ),
    "full": TrainConfig(
        epochs=600, batch_size=30, warmup_epochs=100, ema_every=5, ema_start=4,
        augment=AugmentConfig(illumination=ILLUMINATION),
    ),
}  # fmt: skip


class Trainer:
    """Train a segmentation network with Scribble2Label (or a baseline) from samples.

    Parameters
    ----------
    train : list of TrainSample
        Training images with scribbles.
    config : TrainConfig
        Settings.
    val : list of TrainSample, optional
        Validation images (scribbles; full labels if known).
    device : str or torch.device, optional
        ``"auto"`` (CUDA when present, else the CPU), ``"cpu"`` or ``"cuda"``.
    verbose : bool, optional
        Say which device was chosen.

    Examples
    --------
    >>> trainer = Trainer(train_samples, TrainConfig.profile("cpu"), val=val_samples)
    >>> history = trainer.fit(checkpoint="runs/s2l.pt")
    """

    def __init__(
        self,
        train: Sequence[TrainSample],
        config: TrainConfig,
        *,
        val: Sequence[TrainSample] | None = None,
        device: str | torch.device = "auto",
        verbose: bool = True,
    ) -> None:
        if not train:
            raise ValueError("no training samples")
        ids = [s.image_id for s in train]
        if len(set(ids)) != len(ids):
            raise ValueError("training sample ids must be unique")
        for s in train:
            if s.image.ndim != 3 or s.image.shape[1:] != s.scribble.shape:
                raise ValueError(
                    f"sample {s.image_id}: image {s.image.shape} and scribble "
                    f"{s.scribble.shape} do not fit"
                )
        _check_scribbled(train)
        self.train_samples = list(train)
        self.val_samples = list(val or [])
        self.config = config
        self.device = (
            device if isinstance(device, torch.device) else pick_device(device, verbose=verbose)
        )
        #: bfloat16 autocast on this CPU (asked for and native), used in every pass.
        self.cpu_bf16 = config.cpu_bf16 and self.device.type == "cpu" and cpu_bf16_native()
        if verbose and config.cpu_bf16 and self.device.type == "cpu":
            print(
                "Training in bfloat16 on the CPU"
                if self.cpu_bf16
                else "cpu_bf16: this CPU has no native bfloat16 (AVX512-BF16 or AMX), "
                "so training stays in float32"
            )
        set_seed(config.seed)
        self.model = from_config(config.model)
        multiple = getattr(self.model, "size_multiple", 1)
        if config.augment.crop_size % multiple:
            crop = config.augment.crop_size
            raise ValueError(
                f"augment.crop_size ({crop}) must be a multiple of the network's size "
                f"multiple, {multiple} (e.g. {crop + (-crop) % multiple})"
            )
        self.model.to(self.device)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        groups = parameter_groups(
            self.model, config.lr_encoder, config.lr_decoder, train_head=not config.freeze_head
        )
        if config.optimizer == "radam":
            self.optimizer = torch.optim.RAdam(
                groups, weight_decay=config.weight_decay, decoupled_weight_decay=True
            )
        else:
            self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            self.optimizer, T_0=config.t0, T_mult=config.t_mult, eta_min=config.eta_min
        )
        use_scaler = (
            self.device.type == "cuda" and config.amp and not torch.cuda.is_bf16_supported()
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        self.ema = EMAStore(
            {s.image_id: s.scribble.shape for s in train},
            alpha=config.alpha,
            start=config.ema_start_value,
        )
        self.rng = np.random.default_rng(config.seed)
        self.epoch = 0
        self.iteration = 0
        self.history: list[dict] = []
        self.best: dict | None = None

    # ------------------------------------------------------------------ one epoch

    def iterations_per_epoch(self) -> int:
        """Batches per epoch."""
        n = self.config.samples_per_epoch or len(self.train_samples)
        return math.ceil(n / self.config.batch_size)

    def _epoch_order(self) -> np.ndarray:
        n = self.config.samples_per_epoch or len(self.train_samples)
        reps = math.ceil(n / len(self.train_samples))
        order = np.concatenate([self.rng.permutation(len(self.train_samples)) for _ in range(reps)])
        return order[:n]

    def pseudo_active(self) -> bool:
        """Whether this epoch uses pseudo-labels (after warm-up, once the EMA has data)."""
        c = self.config
        return c.use_pseudo and self.epoch >= c.warmup_epochs and self.ema_updates > 0

    @property
    def ema_updates(self) -> int:
        """EMA passes done so far."""
        return min((self.ema.n_updates(i) for i in self.ema.ids), default=0)

    def _dice_targets(
        self,
        scribble: torch.Tensor,
        ema: torch.Tensor | None,
        valid: torch.Tensor,
        use_pseudo: bool,
    ) -> torch.Tensor:
        """Scribbles, and confident pseudo-labels once they are active: the Dice targets."""
        target = torch.where(valid, scribble.long(), UNLABELLED)
        if use_pseudo and ema is not None:
            pseudo = pseudo_label_targets(ema, target, tau=self.config.tau, valid=valid)
            target = torch.where(target == UNLABELLED, pseudo, target)
        return target

    def train_epoch(self, progress: bool = False) -> dict:
        """Train one epoch; return its averages."""
        c = self.config
        self.model.train()
        use_pseudo = self.pseudo_active()
        order = self._epoch_order()
        sums = dict.fromkeys(("loss", "pce", "pseudo", "affinity", "dice", "pseudo_fraction"), 0.0)
        n_batches = 0
        start = time.perf_counter()
        batches = range(0, len(order), c.batch_size)
        for b in tqdm(batches, desc=f"epoch {self.epoch}", disable=not progress, leave=False):
            chosen = [self.train_samples[k] for k in order[b : b + c.batch_size]]
            crops = random_crops(
                [s.image for s in chosen],
                [s.scribble for s in chosen],
                [self.ema.get(s.image_id) if use_pseudo else None for s in chosen],
                self.rng,
                c.augment,
            )
            pin = self.device.type == "cuda"
            batch = {k: (v.pin_memory() if pin else v) for k, v in crops.items()}
            x = batch["image"].to(self.device, non_blocking=True)
            if c.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            scribble = batch["scribble"].to(self.device, non_blocking=True)
            valid = batch["valid"].to(self.device, non_blocking=True)
            ema = batch["ema"].to(self.device, non_blocking=True) if use_pseudo else None
            with autocast_context(self.device, c.amp, self.cpu_bf16):
                logits = self.model(x)
            loss, parts = scribble2label_loss(
                logits, scribble, ema, tau=c.tau, lam=c.lam, use_pseudo=use_pseudo, valid=valid
            )
            if c.affinity > 0:
                smooth = affinity_loss(logits, x, valid, sigma_intensity=c.affinity_sigma)
                loss = loss + c.affinity * smooth
                sums["affinity"] += float(smooth.detach())
            if c.dice > 0:
                overlap = dice_loss(logits, self._dice_targets(scribble, ema, valid, use_pseudo))
                loss = loss + c.dice * overlap
                sums["dice"] += float(overlap.detach())
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.iteration += 1
            n_batches += 1
            sums["loss"] += float(loss.detach())
            sums["pce"] += parts.pce
            sums["pseudo"] += parts.pseudo
            sums["pseudo_fraction"] += parts.pseudo_fraction
        seconds = time.perf_counter() - start
        row = {k: v / max(n_batches, 1) for k, v in sums.items()}
        row.update(
            epoch=self.epoch,
            iteration=self.iteration,
            lr=self.optimizer.param_groups[1]["lr"],
            pseudo_active=use_pseudo,
            seconds=seconds,
            crops_per_s=len(order) / seconds if seconds > 0 else float("nan"),
        )
        return row

    # ------------------------------------------------------------------ EMA and validation

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Foreground probability ``(H, W)`` of a normalised image with the current model."""
        return predict_foreground(
            self.model,
            image,
            device=self.device,
            amp=self.config.amp,
            channels_last=self.config.channels_last,
            cpu_bf16=self.cpu_bf16,
        )

    def update_ema(self, progress: bool = False) -> dict:
        """Predict every training image and fold it into the EMA store."""
        start = time.perf_counter()
        accuracies, coverages = [], []
        for s in tqdm(self.train_samples, desc="EMA", disable=not progress, leave=False):
            self.ema.update(s.image_id, self.predict(s.image))
            if s.labels is not None:
                q = pseudo_label_accuracy(
                    self.ema, s.image_id, s.labels > 0, s.scribble, self.config.tau
                )
                if q.n_labelled:
                    accuracies.append(q.accuracy)
                coverages.append(q.coverage)
        row = {"ema_seconds": time.perf_counter() - start}
        if coverages:
            row["pseudo_coverage"] = float(np.mean(coverages))
            row["pseudo_accuracy"] = float(np.mean(accuracies)) if accuracies else float("nan")
        return row

    def validate(self) -> dict:
        """Scribble loss (needs only scribbles) and, where full masks exist, IoU."""
        if not self.val_samples:
            return {}
        ious, losses = [], []
        for s in self.val_samples:
            prob = self.predict(s.image)
            scribbled = s.scribble != UNLABELLED
            if scribbled.any():
                p = np.clip(prob[scribbled], 1e-6, 1 - 1e-6)
                fg = s.scribble[scribbled] == FOREGROUND
                losses.append(float(-np.mean(np.where(fg, np.log(p), np.log1p(-p)))))
            if s.labels is not None:
                ious.append(foreground_iou(prob > 0.5, s.labels > 0))
        row = {}
        if losses:
            row["val_scribble_loss"] = float(np.mean(losses))
        if ious:
            row["val_iou_full_masks"] = float(np.mean(ious))
        return row

    def _consider_best(self, row: dict) -> None:
        select = self.config.select
        if select == "last":
            return
        key = "val_scribble_loss" if select == "val_scribble" else "val_iou_full_masks"
        if key not in row:
            return
        score = row[key] if key == "val_iou_full_masks" else -row[key]
        if self.best is None or score > self.best["score"]:
            state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            self.best = {"epoch": self.epoch, "score": score, "key": key, "model": state}

    # ------------------------------------------------------------------ the loop

    def fit(
        self,
        epochs: int | None = None,
        *,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 1,
        progress: bool = True,
    ) -> pd.DataFrame:
        """Train until ``epochs`` epochs are done in total (default ``config.epochs``).

        Parameters
        ----------
        epochs : int, optional
            Total epochs to reach (a resumed trainer continues from its epoch).
        checkpoint : str or os.PathLike, optional
            Where to save the full training state, atomically, every
            ``checkpoint_every`` epochs and at the end.
        checkpoint_every : int, optional
            Checkpoint period in epochs.
        progress : bool, optional
            Show progress bars.

        Returns
        -------
        pandas.DataFrame
            The history, one row per epoch.
        """
        c = self.config
        total = c.epochs if epochs is None else whole_number("epochs", epochs, 0)
        whole_number("checkpoint_every", checkpoint_every, 1)
        bar = tqdm(total=total, initial=self.epoch, desc="training", disable=not progress)
        while self.epoch < total:
            start = time.perf_counter()
            row = self.train_epoch(progress=False)
            last = self.epoch == total - 1
            if c.val_every and ((self.epoch + 1) % c.val_every == 0 or last):
                row.update(self.validate())
                self._consider_best(row)
            # The baselines without pseudo-labels have no use for the EMA store.
            due = ema_due(self.epoch, c.ema_every, c.ema_start)
            row["ema_updated"] = bool(c.use_pseudo and due)
            if row["ema_updated"]:
                row.update(self.update_ema())
            row["epoch_seconds"] = time.perf_counter() - start  # training, validation and EMA
            self.history.append(row)
            self.epoch += 1
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            due = self.epoch % checkpoint_every == 0 or self.epoch == total
            if checkpoint is not None and due:
                self.save(checkpoint)
        bar.close()
        return self.history_frame()

    def history_frame(self) -> pd.DataFrame:
        """The history as a table (one row per epoch)."""
        return pd.DataFrame(self.history)

    def best_state(self) -> tuple[dict, int, str]:
        """The selected weights: ``(state_dict, epoch, how)`` per ``config.select``."""
        if self.config.select != "last" and self.best is not None:
            return self.best["model"], self.best["epoch"], self.best["key"]
        return self.model.state_dict(), self.epoch - 1, "last epoch"

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """Everything needed to continue training exactly (plain types and tensors)."""
        rng = {"numpy": self.rng.bit_generator.state, "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        rng["python"] = list(random.getstate()[1])
        return {
            "format": CHECKPOINT_FORMAT,
            "kind": "training",
            "model_config": self.model.to_config(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict(),
            "rng": rng,
            "epoch": self.epoch,
            "iteration": self.iteration,
            "config": self.config.to_dict(),
            "history": self.history,
            "best": self.best,
            "train_ids": [s.image_id for s in self.train_samples],
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the training state to ``path`` atomically (removing the temporaries of
        killed runs that wrote there)."""
        path = Path(path)
        remove_stale(path)
        with atomic_path(path) as tmp:
            torch.save(self.state_dict(), tmp)
        return path

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from :meth:`state_dict` (same samples and configuration)."""
        if state.get("kind") != "training":
            raise ValueError("not a training checkpoint (it holds no optimiser or EMA state)")
        ids = [s.image_id for s in self.train_samples]
        if state["train_ids"] != ids:
            raise ValueError(
                "the checkpoint was trained on other images: its training ids differ from "
                "the samples given"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.ema.load_state_dict(state["ema"])
        self.rng.bit_generator.state = state["rng"]["numpy"]
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        version, _, gauss = random.getstate()
        random.setstate((version, tuple(state["rng"]["python"]), gauss))
        self.epoch = int(state["epoch"])
        self.iteration = int(state["iteration"])
        self.history = list(state["history"])
        self.best = state["best"]

    @classmethod
    def resume(
        cls,
        path: str | os.PathLike,
        train: Sequence[TrainSample],
        *,
        val: Sequence[TrainSample] | None = None,
        device: str | torch.device = "auto",
        verbose: bool = True,
    ) -> Trainer:
        """Rebuild a trainer from a training checkpoint and continue where it stopped."""
        state = load_checkpoint(path)
        config = TrainConfig.from_dict(state["config"])
        trainer = cls(train, config, val=val, device=device, verbose=verbose)
        trainer.load_state_dict(state)
        return trainer

    def load_weights(self, path: str | os.PathLike) -> None:
        """Start from the weights of a checkpoint (fine-tuning, or a new annotation round).

        Only the network's weights are taken; optimiser, schedule and EMA store start
        afresh. The checkpoint's architecture must equal this trainer's.

        Raises
        ------
        ValueError
            If the architectures differ.
        """
        state = load_checkpoint(path)
        if state["model_config"] != self.model.to_config():
            raise ValueError(
                f"{path} holds a network {state['model_config']}, but this trainer builds "
                f"{self.model.to_config()}; set TrainConfig.model to match"
            )
        self.model.load_state_dict(state["model"])

    def export(
        self,
        path: str | os.PathLike,
        *,
        extra: dict | None = None,
        precision: str = "float32",
    ) -> Path:
        """Write an inference checkpoint of the selected weights (:meth:`best_state`),
        with the network's and the training configuration, by
        :func:`s2l_core.checkpoint.write_model_checkpoint` (which says what ``extra`` may
        hold and how ``precision`` stores the weights).

        Returns
        -------
        pathlib.Path
            ``path``.
        """
        weights, epoch, how = self.best_state()
        return write_model_checkpoint(
            path,
            model_config=self.model.to_config(),
            weights=weights,
            config=self.config.to_dict(),
            selected={"epoch": epoch, "how": how},
            extra=extra,
            precision=precision,
        )
