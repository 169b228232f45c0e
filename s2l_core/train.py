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
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from s2l_core.augment import crops_to_device, random_crops
from s2l_core.checkpoint import (
    CHECKPOINT_FORMAT,
    load_checkpoint,
    write_model_checkpoint,
)
from s2l_core.checks import whole_number
from s2l_core.config import TrainConfig
from s2l_core.encoding import UNLABELLED
from s2l_core.files import atomic_path, remove_stale
from s2l_core.infer import autocast_context, predict_foreground
from s2l_core.losses import affinity_loss, dice_loss, dice_targets, scribble2label_loss
from s2l_core.metrics import foreground_iou, scribble_cross_entropy
from s2l_core.pseudo import EMAStore, ema_due, pseudo_label_accuracy
from s2l_core.runtime import (
    cpu_bf16_wanted,
    pick_device,
    restore_rng_state,
    rng_state,
    set_seed,
)
from s2l_core.samples import TrainSample, check_training_set

__all__ = ["Trainer", "train_step"]


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor | None],
    config: TrainConfig,
    *,
    scaler: torch.amp.GradScaler | None = None,
    bf16: bool = False,
) -> dict[str, float]:
    """One optimisation step of Scribble2Label on one batch of crops.

    The forward pass, the loss (partial cross-entropy on the scribbles, plus ``lam`` times
    the cross-entropy on confident pseudo-labels when the batch has EMA maps, plus the
    optional affinity and Dice terms of ``config``), the backward pass and the
    optimiser's step. The learning-rate schedule is the caller's.

    Parameters
    ----------
    model : torch.nn.Module
        The network, in training mode.
    optimizer : torch.optim.Optimizer
        Its optimiser.
    batch : dict
        Tensors on the model's device: ``"image"`` ``(B, 3, H, W)``, ``"scribble"`` and
        ``"valid"`` ``(B, H, W)``, ``"ema"`` ``(B, H, W)`` or ``None`` (no pseudo-labels:
        warm-up, or a baseline).
    config : TrainConfig
        ``tau``, ``lam``, ``affinity``, ``affinity_sigma``, ``dice`` and ``amp``.
    scaler : torch.amp.GradScaler, optional
        Loss scaling for float16 on CUDA; ``None`` steps plainly.
    bf16 : bool, optional
        bfloat16 autocast on the CPU.

    Returns
    -------
    dict of str to float
        ``loss`` and its parts: ``pce``, ``pseudo``, ``pseudo_fraction``, ``affinity``,
        ``dice`` (0 where a term is off).
    """
    x, scribble, valid, ema = batch["image"], batch["scribble"], batch["valid"], batch["ema"]
    use_pseudo = ema is not None
    with autocast_context(x.device, config.amp, bf16):
        logits = model(x)
    # The samples and the configuration were checked when made: no checks per batch.
    loss, parts = scribble2label_loss(
        logits, scribble, ema, tau=config.tau, lam=config.lam, use_pseudo=use_pseudo,
        valid=valid, check=False,
    )  # fmt: skip
    out = {"pce": parts.pce, "pseudo": parts.pseudo, "pseudo_fraction": parts.pseudo_fraction}
    out["affinity"] = out["dice"] = 0.0
    if config.affinity > 0:
        smooth = affinity_loss(logits, x, valid, sigma_intensity=config.affinity_sigma)
        loss = loss + config.affinity * smooth
        out["affinity"] = float(smooth.detach())
    if config.dice > 0:
        overlap = dice_loss(logits, dice_targets(scribble, ema, valid, tau=config.tau, check=False))
        loss = loss + config.dice * overlap
        out["dice"] = float(overlap.detach())
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    out["loss"] = float(loss.detach())
    return out


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
        check_training_set(train)
        self.train_samples = list(train)
        self.val_samples = list(val or [])
        self.config = config
        self.device = (
            device if isinstance(device, torch.device) else pick_device(device, verbose=verbose)
        )
        #: bfloat16 autocast on this CPU (asked for and native), used in every pass.
        self.cpu_bf16 = cpu_bf16_wanted(config.cpu_bf16, self.device, verbose=verbose)
        set_seed(config.seed)
        self.model = config.build_model()
        self.model.to(self.device)
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer, self.scheduler = config.optimizer_for(self.model)
        # Loss scaling for float16, where CUDA has no bfloat16 (off elsewhere).
        fp16 = self.device.type == "cuda" and config.amp and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
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

    def train_epoch(self, progress: bool = False) -> dict:
        """Train one epoch (:func:`train_step` on every batch); return its averages."""
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
            batch = crops_to_device(crops, self.device, c.channels_last, use_pseudo)
            parts = train_step(
                self.model, self.optimizer, batch, c, scaler=self.scaler, bf16=self.cpu_bf16
            )
            self.scheduler.step()
            self.iteration += 1
            n_batches += 1
            for key in sums:
                sums[key] += parts[key]
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
            if (s.scribble != UNLABELLED).any():
                losses.append(scribble_cross_entropy(prob, s.scribble))
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
        return {
            "format": CHECKPOINT_FORMAT,
            "kind": "training",
            "model_config": self.model.to_config(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict(),
            "rng": rng_state(self.rng),
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
        restore_rng_state(self.rng, state["rng"])
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
