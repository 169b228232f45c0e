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

Several processes (``torchrun``, :mod:`s2l_core.distributed`) train one network
together, data-parallel; one process alone runs exactly as without them:

- the network is wrapped in ``DistributedDataParallel`` (:attr:`Trainer.step_model`),
  which averages every step's gradients over the processes, so all hold the same weights;
- every process draws the same permutation of the epoch's samples from the seeded
  generator (so that generator's state stays the same everywhere) and trains on every
  N-th crop of it, ``batch_size`` crops per step: a step sees N × ``batch_size`` crops
  and an epoch has about 1/N as many steps. Each process augments with its own
  generator, made afresh every epoch from the seed, the epoch and its rank;
- the EMA pass is shared (image i on process i mod N); the predictions are exchanged and
  every process folds all of them into its store in the same order, so every store holds
  the same maps. Validation is shared the same way; every process gets the same history
  row (losses averaged over the processes) and so selects the same best weights;
- the main process alone writes checkpoints, atomically, and the others wait for it. The
  training state does not depend on the number of processes, apart from the iteration
  count (steps taken) and ``world_size`` (the number that wrote it): a state written by N
  processes resumes in any number of them.

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

from s2l_core import distributed
from s2l_core.augment import (
    CropSource,
    crops_to_device,
    draw_crop_params,
    random_crops,
    render_crops,
)
from s2l_core.checkpoint import (
    CHECKPOINT_FORMAT,
    load_checkpoint,
    write_model_checkpoint,
)
from s2l_core.checks import whole_number
from s2l_core.config import TrainConfig
from s2l_core.encoding import UNLABELLED
from s2l_core.files import atomic_path, remove_stale
from s2l_core.infer import TILE, autocast_context, predict_batch, predict_foreground
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

#: Spawn key of the per-process augmentation generators of a multi-process run (a
#: stream of the seed apart from :attr:`Trainer.rng`'s).
_AUGMENT_STREAM = 0x5_32_4C
#: Validation images per process between two exchanges of scores (several processes).
_VALIDATION_ROUND = 8


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
        The network, in training mode; in a run of several processes, the network in
        ``DistributedDataParallel`` (:attr:`Trainer.step_model`), whose backward pass
        averages the gradients over the processes.
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
    x, scribble, valid = batch["image"], batch["scribble"], batch["valid"]
    ema = batch["ema"]
    use_pseudo = ema is not None
    with autocast_context(x.device, config.amp, bf16):
        logits = model(x)
    # The samples and the configuration were checked when made: no checks per batch.
    loss, parts = scribble2label_loss(
        logits, scribble, ema, tau=config.tau, lam=config.lam, use_pseudo=use_pseudo,
        valid=valid, check=False,
    )  # fmt: skip
    out = {"pce": parts.pce, "pseudo": parts.pseudo}
    out["pseudo_fraction"] = parts.pseudo_fraction
    out["affinity"] = out["dice"] = 0.0
    if config.affinity > 0:
        smooth = affinity_loss(logits, x, valid, sigma_intensity=config.affinity_sigma)
        loss = loss + config.affinity * smooth
        out["affinity"] = float(smooth.detach())
    if config.dice > 0:
        targets = dice_targets(scribble, ema, valid, tau=config.tau, check=False)
        overlap = dice_loss(logits, targets)
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
        ``"auto"`` (CUDA when present, else the CPU), ``"cpu"`` or ``"cuda"``. In a run of
        several processes, ``"auto"`` and ``"cuda"`` are this process's own GPU,
        ``cuda:LOCAL_RANK`` (:func:`s2l_core.distributed.local_device`).
    verbose : bool, optional
        Say which device was chosen (the main process only).

    Notes
    -----
    Under ``torchrun``, call :func:`s2l_core.distributed.setup` first and give every
    process the same samples, in the same order, and the same configuration (checked
    here); the module docstring says how the work is shared.

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
        #: Processes training together (1 without a launcher) and this one's index.
        self.world_size = distributed.world_size()
        self.rank = distributed.rank()
        verbose = verbose and self.rank == 0
        if self.world_size > 1:
            self._check_same_everywhere()
            self.device = distributed.local_device(device, verbose=verbose)
        else:
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
        #: The module :func:`train_step` trains: :attr:`model` itself, or with several
        #: processes :attr:`model` in ``DistributedDataParallel`` (same parameters).
        self.step_model = distributed.wrap_model(self.model, self.device)
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
        #: Processes that wrote the state this trainer resumed from (None: not resumed).
        self.resumed_world_size: int | None = None
        #: On a GPU the training images live there and every batch of crops is made
        #: there in one batched resampling (:func:`s2l_core.augment.render_crops`, the
        #: same random choices as :func:`s2l_core.augment.random_crops`); on the CPU
        #: the crops are made one by one, which is as fast there and bit-exact.
        self.crop_source = (
            CropSource(
                [s.image for s in self.train_samples],
                [s.scribble for s in self.train_samples],
                self.device,
            )
            if self.device.type == "cuda"
            else None
        )
        self._ema_version = 0  # changes with the EMA store, which the source copies
        #: Images of one size that the EMA pass predicts in one batch: on a GPU several
        #: (:func:`s2l_core.infer.predict_batch`), on the CPU one at a time (as fast).
        self.ema_batch = 8 if self.device.type == "cuda" else 1
        self._source_ema_version = -1

    def _check_same_everywhere(self) -> None:
        """Refuse processes that were given other samples or settings than the main one
        (they would train different networks under one name)."""
        mine = {
            "train": [(s.image_id, s.scribble.shape) for s in self.train_samples],
            "val": [(s.image_id, s.scribble.shape) for s in self.val_samples],
            "config": self.config.to_dict(),
        }
        views = distributed.all_gather_object(mine, "comparing the training sets")
        for other, view in enumerate(views):
            for key in ("train", "val", "config"):
                if view[key] != views[0][key]:
                    what = {"train": "training samples", "val": "validation samples"}
                    raise ValueError(
                        f"process {other} of {self.world_size} was given other "
                        f"{what.get(key, 'settings')} than process 0: every process must "
                        "load the same images, in the same order, with the same "
                        "configuration (are the data on a file system every machine sees?)"
                    )

    # ------------------------------------------------------------------ one epoch

    def iterations_per_epoch(self) -> int:
        """Batches (optimiser steps) per epoch: each process trains on its share of the
        epoch's crops, ``batch_size`` at a time."""
        n = self.config.samples_per_epoch or len(self.train_samples)
        return math.ceil(math.ceil(n / self.world_size) / self.config.batch_size)

    def _epoch_order(self) -> np.ndarray:
        n = self.config.samples_per_epoch or len(self.train_samples)
        reps = math.ceil(n / len(self.train_samples))
        order = np.concatenate([self.rng.permutation(len(self.train_samples)) for _ in range(reps)])
        return order[:n]

    def _share_of(self, order: np.ndarray) -> np.ndarray:
        """This process's crops of the epoch's order: every N-th, from its rank, of the
        order repeated to a multiple of N (so that every process takes as many steps);
        the whole order alone."""
        n = self.world_size
        if n == 1:
            return order
        per_process = math.ceil(len(order) / n)
        return np.resize(order, per_process * n)[self.rank :: n]

    def _augment_rng(self) -> np.random.Generator:
        """The generator of this epoch's crops and augmentations: :attr:`rng` alone; with
        several processes, one of this process's own, made from the seed, the epoch and
        the rank (so that it needs no saving and a run resumes at any number of
        processes)."""
        if self.world_size == 1:
            return self.rng
        seed = np.random.SeedSequence(
            self.config.seed, spawn_key=(_AUGMENT_STREAM, self.epoch, self.rank)
        )
        return np.random.default_rng(seed)

    def pseudo_active(self) -> bool:
        """Whether this epoch uses pseudo-labels (after warm-up, once the EMA has data)."""
        c = self.config
        return c.use_pseudo and self.epoch >= c.warmup_epochs and self.ema_updates > 0

    @property
    def ema_updates(self) -> int:
        """EMA passes done so far."""
        return min((self.ema.n_updates(i) for i in self.ema.ids), default=0)

    def train_epoch(self, progress: bool = False) -> dict:
        """Train one epoch (:func:`train_step` on every batch); return its averages.

        With several processes, each trains on its share of the epoch's crops and the
        averages are over all of them (the same row on every process); ``seconds`` is
        the slowest process's and ``crops_per_s`` counts the crops of all.
        """
        c = self.config
        self.step_model.train()
        use_pseudo = self.pseudo_active()
        order = self._share_of(self._epoch_order())
        rng = self._augment_rng()
        sums = dict.fromkeys(("loss", "pce", "pseudo", "affinity", "dice", "pseudo_fraction"), 0.0)
        n_batches = 0
        start = time.perf_counter()
        batches = range(0, len(order), c.batch_size)
        show = progress and self.rank == 0
        source = self.crop_source
        if source is not None and use_pseudo and self._source_ema_version != self._ema_version:
            source.set_emas([self.ema.get(s.image_id) for s in self.train_samples])
            self._source_ema_version = self._ema_version
        for b in tqdm(batches, desc=f"epoch {self.epoch}", disable=not show, leave=False):
            ids = order[b : b + c.batch_size]
            if source is not None:
                params = draw_crop_params([source.shape(k) for k in ids], rng, c.augment)
                crops = render_crops(params, source, ids, with_ema=use_pseudo)
            else:
                chosen = [self.train_samples[k] for k in ids]
                crops = random_crops(
                    [s.image for s in chosen],
                    [s.scribble for s in chosen],
                    [self.ema.get(s.image_id) if use_pseudo else None for s in chosen],
                    rng,
                    c.augment,
                )
            batch = crops_to_device(crops, self.device, c.channels_last, use_pseudo)
            parts = train_step(
                self.step_model, self.optimizer, batch, c, scaler=self.scaler, bf16=self.cpu_bf16
            )
            self.scheduler.step()
            self.iteration += 1
            n_batches += 1
            for key in sums:
                sums[key] += parts[key]
        seconds = time.perf_counter() - start
        crops_done = len(order)
        if self.world_size > 1:
            sums, n_batches, seconds, crops_done = self._combine(
                sums, n_batches, seconds, crops_done
            )
            # Batch norm statistics drift apart in the last step: the main process's count.
            distributed.broadcast_buffers(self.model)
        row = {k: v / max(n_batches, 1) for k, v in sums.items()}
        row.update(
            epoch=self.epoch,
            iteration=self.iteration,
            lr=self.optimizer.param_groups[1]["lr"],
            pseudo_active=use_pseudo,
            seconds=seconds,
            crops_per_s=crops_done / seconds if seconds > 0 else float("nan"),
        )
        return row

    @staticmethod
    def _combine(
        sums: dict[str, float], n_batches: int, seconds: float, crops: int
    ) -> tuple[dict[str, float], int, float, int]:
        """Every process's loss sums, batches and crops of an epoch, added up in rank
        order (so the same on every process), and the slowest process's seconds."""
        parts = distributed.all_gather_object(
            (sums, n_batches, seconds, crops), "averaging the epoch's losses"
        )
        total = dict.fromkeys(sums, 0.0)
        for part, *_ in parts:
            for key in total:
                total[key] += part[key]
        batches = sum(p[1] for p in parts)
        return total, batches, max(p[2] for p in parts), sum(p[3] for p in parts)

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
        """Predict every training image and fold it into the EMA store.

        With N processes, image i is predicted by process i mod N; each round of N
        predictions is exchanged and every process folds all of them into its store in
        the order of the images, so that every store holds the same maps (the maps one
        process alone makes from the same network). Pseudo-label accuracy and coverage
        (where full labels are known) are the means over all images, on every process.
        """
        start = time.perf_counter()
        samples, n, rank = self.train_samples, self.world_size, self.rank
        quality: dict[int, tuple[float | None, float]] = {}
        bar = tqdm(
            total=len(samples), desc="EMA", disable=not (progress and rank == 0), leave=False
        )
        own_probs = self._predict_batched(range(rank, len(samples), n))
        for first in range(0, len(samples), n):
            own = first + rank
            prob = own_probs.pop(own, None)
            if prob is None and own < len(samples):
                prob = self.predict(samples[own].image)
            round_ = [prob] if n == 1 else distributed.all_gather_object(prob, "the EMA pass")
            for k, p in enumerate(round_[: len(samples) - first]):
                self.ema.update(samples[first + k].image_id, p)
            self._ema_version += 1
            if own < len(samples) and samples[own].labels is not None:
                s = samples[own]
                q = pseudo_label_accuracy(
                    self.ema, s.image_id, s.labels > 0, s.scribble, self.config.tau
                )
                quality[own] = (q.accuracy if q.n_labelled else None, q.coverage)
            bar.update(min(n, len(samples) - first))
        bar.close()
        if n > 1:
            for part in distributed.all_gather_object(quality, "the EMA pass's accuracy"):
                quality.update(part)
        ordered = [quality[i] for i in sorted(quality)]
        accuracies = [a for a, _ in ordered if a is not None]
        coverages = [c for _, c in ordered]
        row = {"ema_seconds": time.perf_counter() - start}
        if coverages:
            row["pseudo_coverage"] = float(np.mean(coverages))
            row["pseudo_accuracy"] = float(np.mean(accuracies)) if accuracies else float("nan")
        return row

    def _predict_batched(self, indices: Sequence[int]) -> dict[int, np.ndarray]:
        """Probabilities of the training images ``indices`` that :attr:`ema_batch`
        predicts in batches (equal shapes, no tiling); the others are left to
        :meth:`predict`, one by one."""
        if self.ema_batch <= 1:
            return {}
        by_shape: dict[tuple, list[int]] = {}
        for i in indices:
            image = self.train_samples[i].image
            if max(image.shape[-2:]) <= TILE:  # seen whole by predict_foreground too
                by_shape.setdefault(image.shape, []).append(i)
        out = {}
        for group in by_shape.values():
            for b in range(0, len(group), self.ema_batch):
                chunk = group[b : b + self.ema_batch]
                probs = predict_batch(
                    self.model,
                    [self.train_samples[i].image for i in chunk],
                    device=self.device,
                    amp=self.config.amp,
                    channels_last=self.config.channels_last,
                    cpu_bf16=self.cpu_bf16,
                )
                out.update(zip(chunk, probs, strict=True))
        return out

    def validate(self) -> dict:
        """Scribble loss (needs only scribbles) and, where full masks exist, IoU.

        With N processes, image i is scored by process i mod N and the scores are
        exchanged (every few images): every process returns the same means.
        """
        if not self.val_samples:
            return {}
        scores: dict[int, tuple[float | None, float | None]] = {}
        for mine in distributed.rounds(len(self.val_samples), _VALIDATION_ROUND):
            found = {}
            for i in mine:
                s = self.val_samples[i]
                prob = self.predict(s.image)
                loss = iou = None
                if (s.scribble != UNLABELLED).any():
                    loss = scribble_cross_entropy(prob, s.scribble)
                if s.labels is not None:
                    iou = foreground_iou(prob > 0.5, s.labels > 0)
                found[i] = (loss, iou)
            for part in distributed.all_gather_object(found, "validation"):
                scores.update(part)
        ordered = [scores[i] for i in sorted(scores)]
        losses = [loss for loss, _ in ordered if loss is not None]
        ious = [iou for _, iou in ordered if iou is not None]
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
        show = progress and self.rank == 0
        bar = tqdm(total=total, initial=self.epoch, desc="training", disable=not show)
        while self.epoch < total:
            start = time.perf_counter()
            row = self._train_epoch_together()
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

    def _train_epoch_together(self) -> dict:
        """:meth:`train_epoch`; with several processes, an error here (where the
        processes meet at every step) says that another process may be its cause."""
        if self.world_size == 1:
            return self.train_epoch(progress=False)
        try:
            return self.train_epoch(progress=False)
        except distributed.DistributedError:
            raise
        except RuntimeError as err:
            raise RuntimeError(
                f"training epoch {self.epoch} stopped{distributed.process_label()}: {err} "
                "(if another process failed first, its error, printed above, is the cause)"
            ) from err

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
            "world_size": self.world_size,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the training state to ``path`` atomically (removing the temporaries of
        killed runs that wrote there).

        With several processes the main process writes it and the others wait until it
        is written (or fail with it, :func:`s2l_core.distributed.on_main`); the state is
        the same on every process.
        """
        path = Path(path)

        def write() -> None:
            remove_stale(path)
            with atomic_path(path) as tmp:
                torch.save(self.state_dict(), tmp)

        distributed.on_main(write, f"writing the training state {path}")
        return path

    def load_state_dict(self, state: dict) -> None:
        """Restore a state from :meth:`state_dict` (same samples and configuration),
        written by any number of processes."""
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
        self._ema_version += 1
        restore_rng_state(self.rng, state["rng"])
        self.epoch = int(state["epoch"])
        self.iteration = int(state["iteration"])
        self.history = list(state["history"])
        self.best = state["best"]
        self.resumed_world_size = int(state.get("world_size", 1))

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
        """Rebuild a trainer from a training checkpoint and continue where it stopped
        (with any number of processes: every process reads ``path``)."""
        state = distributed.on_every_rank(lambda: load_checkpoint(path), f"reading {path}")
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
        hold and how ``precision`` stores the weights). With several processes the main
        process writes it and the others wait.

        Returns
        -------
        pathlib.Path
            ``path``.
        """
        weights, epoch, how = self.best_state()
        return distributed.on_main(
            lambda: write_model_checkpoint(
                path,
                model_config=self.model.to_config(),
                weights=weights,
                config=self.config.to_dict(),
                selected={"epoch": epoch, "how": how},
                extra=extra,
                precision=precision,
            ),
            f"writing the model {path}",
        )
