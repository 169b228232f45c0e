"""Human in the loop: scribble, train a little, look, correct, continue.

Each round takes the current scribbles of a set of images, trains a few epochs starting
from the previous round's weights (or a given checkpoint), and predicts every image with
its foreground probability and uncertainty, so the annotator can add scribbles where the
model is wrong or unsure. Every round keeps its own scribbles and checkpoint::

    work_dir/round_01/scribbles/<image>.png   the scribbles this round trained on
    work_dir/round_01/model.pt                the weights after the round
    work_dir/round_01/state.pt                the full training state
    work_dir/round_01/history.csv             the round's training history

The predictions take the same settings as :func:`s2l_core.predict.predict_folder` and
``s2l predict``: one :class:`s2l_core.predict.Preset` (magnification, test-time
augmentation, threshold, hysteresis level, smoothing, smallest nucleus), the package's
defaults unless told otherwise; every round's checkpoint stores it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from s2l_core.augment import normalize_image, select_channel
from s2l_core.config import TrainConfig
from s2l_core.encoding import UNLABELLED, save_scribble, validate_scribble
from s2l_core.files import read_image
from s2l_core.predict import (
    Preset,
    claim_outputs,
    list_images,
    record_outputs,
    save_labels,
    uncertainty,
)
from s2l_core.samples import TrainSample
from s2l_core.train import Trainer

__all__ = ["AnnotationLoop", "Round", "uncertainty"]


@dataclass
class Round:
    """One annotation round.

    Attributes
    ----------
    number : int
        1 for the first round.
    folder : pathlib.Path
        Where its scribbles, checkpoint and history are kept.
    checkpoint : pathlib.Path
        The weights after the round.
    probabilities : dict of str to numpy.ndarray
        ``(H, W)`` ``float32`` foreground probability of every image.
    scales : dict of str to float
        The magnification each image was predicted at (1 unless the loop's ``scale``
        says otherwise).
    """

    number: int
    folder: Path
    checkpoint: Path
    probabilities: dict[str, np.ndarray] = field(repr=False)
    scales: dict[str, float] = field(default_factory=dict, repr=False)

    def uncertainty(self, image_id: str) -> np.ndarray:
        """``(H, W)`` uncertainty of one image (see :func:`uncertainty`)."""
        return uncertainty(self.probabilities[image_id])


class AnnotationLoop:
    """Rounds of scribbling and training on a user's own images.

    Parameters
    ----------
    images : mapping of str to numpy.ndarray, or str or os.PathLike
        The images by name, or a folder of image files (PNG, TIFF, JPEG; any bit depth).
    work_dir : str or os.PathLike
        Where the rounds are kept.
    config : TrainConfig, optional
        Training settings of every round; default the ``cpu`` profile with 128 crops per
        epoch (a few images make short epochs), 4 warm-up epochs and an EMA update after
        every epoch, so that pseudo-labels take part within a short round.
    start_from : str or os.PathLike, optional
        A checkpoint to start the first round from (e.g. the book's reference model).
    device : str, optional
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    channel : int, optional
        Work on this channel of multi-channel images
        (:func:`s2l_core.augment.select_channel`), e.g. the nuclear stain.
    preset : Preset, optional
        How every round predicts (``scale``, ``tta``, ``diameter``) and how
        :meth:`export_labels` turns probabilities into labels (``threshold``, ``method``,
        ``min_size``, ``min_peak``, ``smooth``); default :class:`s2l_core.predict.Preset`.
        The probabilities always have the image's own size. To change one setting:
        ``Preset().but(tta=False)``.

    Raises
    ------
    ValueError
        No image, two image files of one name (``a.png`` and ``a.tif``), or a channel
        the images lack.
    """

    def __init__(
        self,
        images: Mapping[str, np.ndarray] | str | os.PathLike,
        work_dir: str | os.PathLike,
        *,
        config: TrainConfig | None = None,
        start_from: str | os.PathLike | None = None,
        device: str = "auto",
        channel: int | None = None,
        preset: Preset | None = None,
    ) -> None:
        self.preset = preset or Preset()
        if isinstance(images, Mapping):
            images = {str(k): np.asarray(v) for k, v in images.items()}
        else:
            folder = Path(images)
            files = list_images(folder)
            stems: dict[str, list[str]] = {}
            for p in files:
                stems.setdefault(p.stem, []).append(p.name)
            shared = [" and ".join(names) for names in stems.values() if len(names) > 1]
            if shared:
                raise ValueError(
                    f"images of {folder} share a name, and the loop knows images by name: "
                    f"{'; '.join(shared[:5])}; rename or move one of each"
                )
            images = {p.stem: read_image(p) for p in files}
        self.images = {}
        for name, image in images.items():
            try:
                self.images[name] = select_channel(image, channel)
            except ValueError as err:
                raise ValueError(f"image {name!r}: {err}") from err
        if not self.images:
            raise ValueError("no images to annotate")
        self.normalized = {k: normalize_image(v) for k, v in self.images.items()}
        self.work_dir = Path(work_dir)
        base = config or TrainConfig.profile(
            "cpu", samples_per_epoch=128, warmup_epochs=4, ema_every=1, ema_start=1
        )
        self.config = replace(base, val_every=0)
        self.device = device
        self.rounds: list[Round] = []
        self.start_from = Path(start_from) if start_from is not None else None

    def blank_scribbles(self) -> dict[str, np.ndarray]:
        """An all-unlabelled scribble image for every image."""
        return {k: np.full(v.shape[1:], UNLABELLED, np.uint8) for k, v in self.normalized.items()}

    def run_round(self, scribbles: Mapping[str, np.ndarray], epochs: int = 10) -> Round:
        """Train one round on the given scribbles and predict every image.

        Parameters
        ----------
        scribbles : mapping of str to numpy.ndarray
            ``(H, W)`` scribble image per image name (0 background, 1 foreground, 250
            unlabelled); images without any scribbled pixel are not trained on.
        epochs : int, optional
            Epochs of this round.

        Returns
        -------
        Round

        Raises
        ------
        ValueError
            Unknown image names, scribbles that do not fit their image, or no scribbled
            pixel of both classes anywhere.
        """
        unknown = sorted(set(scribbles) - set(self.images))
        if unknown:
            raise ValueError(f"scribbles for unknown images: {unknown[:5]}")
        number = len(self.rounds) + 1
        folder = self.work_dir / f"round_{number:02d}"
        checked = {}  # checked before anything of the round is written
        for name, scribble in scribbles.items():
            try:
                checked[name] = validate_scribble(scribble, self.normalized[name].shape[1:])
            except ValueError as err:
                raise ValueError(f"image {name!r}: {err}") from None
        samples = [
            TrainSample(name, self.normalized[name], scribble)
            for name, scribble in checked.items()
            if np.any(scribble != UNLABELLED)
        ]
        labelled = np.concatenate([s.scribble[s.scribble != UNLABELLED] for s in samples] or [[]])
        if not (np.any(labelled == 0) and np.any(labelled == 1)):
            raise ValueError("scribble some foreground and some background before training")
        trainer = Trainer(samples, self.config, device=self.device, verbose=number == 1)
        previous = self.rounds[-1].checkpoint if self.rounds else self.start_from
        if previous is not None:
            trainer.load_weights(previous)
        # fit checks ``epochs`` before it writes its first checkpoint into the folder.
        history = trainer.fit(epochs, checkpoint=folder / "state.pt", progress=False)
        for name, scribble in checked.items():
            save_scribble(folder / "scribbles" / f"{name}.png", scribble)
        history.to_csv(folder / "history.csv", index=False)
        checkpoint = trainer.export(
            folder / "model.pt", extra={"round": number, "preset": self.preset.to_dict()}
        )
        probabilities, scales = {}, {}
        for k, v in self.normalized.items():
            probabilities[k], scales[k] = self.preset.probability(
                trainer.model, v, device=trainer.device
            )
        result = Round(number, folder, checkpoint, probabilities, scales)
        self.rounds.append(result)
        return result

    def export_labels(
        self,
        out_dir: str | os.PathLike,
        *,
        method: str | None = None,
        suffix: str = ".tif",
        min_size: int | None = None,
    ) -> list[Path]:
        """Write instance label images of the last round (napari / Fiji open them).

        The foreground of each probability is split into nuclei
        (:func:`s2l_core.predict.labels_of`, with the loop's preset, its sizes in the
        network's pixels at the scale each image was predicted at).

        Parameters
        ----------
        out_dir : str or os.PathLike
            Folder for the label images.
        method : {"watershed", "components"}, optional
            How to split the foreground into nuclei (default: the preset's).
        suffix : str, optional
            File type: ``".tif"`` or ``".png"``.
        min_size : int, optional
            Smallest nucleus kept, in pixels (default: the preset's).

        Returns
        -------
        list of pathlib.Path
            One ``<name><suffix>`` per image.

        Raises
        ------
        ValueError
            If ``out_dir`` holds a file of an output's name that no earlier export (or
            ``s2l predict``) wrote there, as its ``s2l_predict.json`` records: such files
            are never replaced. Files of earlier exports are.
        """
        if not self.rounds:
            raise RuntimeError("run a round before exporting labels")
        preset = self.preset.but(method=method, min_size=min_size)
        out_dir = Path(out_dir)
        last = self.rounds[-1]
        names = [f"{name}{suffix}" for name in last.probabilities]
        owned = claim_outputs(out_dir, names)
        for name, prob in last.probabilities.items():
            labels = preset.labels(prob, last.scales.get(name, 1.0))
            save_labels(out_dir / f"{name}{suffix}", labels)
        record = {"round": len(self.rounds), "preset": preset.to_dict(), "outputs": names}
        record_outputs(out_dir, dict(record, complete=True), owned)
        return [out_dir / name for name in names]
