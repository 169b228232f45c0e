"""Training settings: :class:`TrainConfig` and the named budgets, :data:`PROFILES`.

The bare ``TrainConfig()`` is the ``cpu`` profile, the budget every result of the book
and the reference checkpoints were trained with; the other profiles change what differs
from it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from s2l_core.augment import AugmentConfig
from s2l_core.checks import check_tau, whole_number
from s2l_core.model import from_config, parameter_groups

__all__ = ["ILLUMINATION", "PROFILES", "SELECTIONS", "TrainConfig"]

#: How :meth:`s2l_core.train.Trainer.best_state` may choose the weights to keep.
SELECTIONS = ("last", "val_scribble", "val_iou_full_masks")


#: Amplitude range of the illumination-field augmentation of the ``cpu`` and ``full``
#: profiles (:class:`s2l_core.augment.AugmentConfig`;
#: ``benchmarks/results/variants/``).
ILLUMINATION: tuple[float, float] = (-0.2, 0.5)


@dataclass
class TrainConfig:
    """Every setting of a training run; the defaults are the ``cpu`` profile.

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
        float32, with a note. Faster at the same quality where it is native
        (``benchmarks/results/speed/model.json``). Off by default.
    model : dict
        Keyword arguments of :class:`s2l_core.model.UNet`.
    augment : AugmentConfig
        Augmentation.
    """

    epochs: int = 48
    batch_size: int = 16
    samples_per_epoch: int | None = None
    warmup_epochs: int = 15
    ema_every: int = 3
    ema_start: int = 2
    alpha: float = 0.2
    ema_start_value: str = "first"
    tau: float = 0.8
    lam: float = 0.5
    use_pseudo: bool = True
    affinity: float = 0.0
    affinity_sigma: float = 0.1
    dice: float = 0.0
    optimizer: str = "adamw"
    lr_encoder: float = 1e-3
    lr_decoder: float = 3e-3
    weight_decay: float = 5e-5
    t0: int = 2
    t_mult: int = 2
    eta_min: float = 1e-6
    freeze_head: bool = False
    val_every: int = 6
    select: str = "last"
    seed: int = 0
    amp: bool = True
    channels_last: bool = True
    cpu_bf16: bool = False
    model: dict = field(default_factory=dict)
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(illumination=ILLUMINATION))

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

    def build_model(self) -> torch.nn.Module:
        """A new network of :attr:`model` (:func:`s2l_core.model.from_config`), checked
        against the crop size (a multiple of the network's size multiple)."""
        model = from_config(self.model)
        multiple = getattr(model, "size_multiple", 1)
        crop = self.augment.crop_size
        if crop % multiple:
            raise ValueError(
                f"augment.crop_size ({crop}) must be a multiple of the network's size "
                f"multiple, {multiple} (e.g. {crop + (-crop) % multiple})"
            )
        return model

    def optimizer_for(self, model: torch.nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        """The optimiser (``optimizer``, learning rates and weight decay per part of the
        network) and its cosine schedule with warm restarts, stepped every iteration."""
        groups = parameter_groups(
            model, self.lr_encoder, self.lr_decoder, train_head=not self.freeze_head
        )
        if self.optimizer == "radam":
            optimizer = torch.optim.RAdam(
                groups, weight_decay=self.weight_decay, decoupled_weight_decay=True
            )
        else:
            optimizer = torch.optim.AdamW(groups, weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            optimizer, T_0=self.t0, T_mult=self.t_mult, eta_min=self.eta_min
        )
        return optimizer, scheduler

    @classmethod
    def profile(cls, name: str, **overrides: Any) -> TrainConfig:
        """A named budget: ``smoke``, ``cpu`` or ``full`` (see :data:`PROFILES`)."""
        if name not in PROFILES:
            raise ValueError(f"unknown profile {name!r}; choose from {sorted(PROFILES)}")
        return replace(PROFILES[name], **overrides)


#: Named budgets. ``cpu`` (the defaults, ``TrainConfig()``) trains on the fluorescence
#: training split (328 images) in under half an hour on a 2-core CPU with AVX-512, in
#: about 70 minutes on one with AVX2 only (``docs/benchmarks.md``, chapter times): 48
#: epochs of 21 batches, so that the last cosine cycle (iterations 510-1022) ends with
#: the run, and AdamW, whose step size is not held back over the first few hundred
#: iterations as RAdam's is.
#: ``full`` is the paper's schedule for a GPU: RAdam, 600 epochs of 30 crops, 100 of them
#: warm-up. Both add smooth illumination fields to half of the crops. ``smoke`` runs in
#: seconds: a test that the code runs, not a result.
PROFILES: dict[str, TrainConfig] = {
    "smoke": TrainConfig(
        epochs=3, batch_size=4, samples_per_epoch=8, warmup_epochs=1, ema_every=1,
        ema_start=0, val_every=3, optimizer="radam", lr_encoder=3e-4,
        augment=AugmentConfig(crop_size=128),
    ),
    "cpu": TrainConfig(),
    "full": TrainConfig(
        epochs=600, batch_size=30, warmup_epochs=100, ema_every=5, ema_start=4, val_every=5,
        optimizer="radam", lr_encoder=3e-4,
    ),
}  # fmt: skip
