"""Image normalisation and the joint augmentation of image, scribbles and EMA map.

Geometric augmentation moves the image, its scribbles and its EMA map together (one
sampling grid for all of them), so nothing has to be inverted afterwards. Wherever the
crop reaches outside the image, the returned ``valid`` mask is ``False`` and the
scribble is unlabelled (250) — never background.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from s2l_core.checks import whole_number
from s2l_core.encoding import UNLABELLED

__all__ = [
    "MAX_CHANNELS",
    "AugmentConfig",
    "crops_to_device",
    "normalize_image",
    "random_crops",
    "select_channel",
]


#: Most channels an axis may have to be taken for the channel axis by :func:`select_channel`.
MAX_CHANNELS = 8


def select_channel(image: np.ndarray, channel: int | None) -> np.ndarray:
    """One channel of a multi-channel image, e.g. the nuclear stain of a 2-channel TIFF.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W, C)`` (channels last, as RGB) or ``(C, H, W)`` (channels first, as many
        microscopy TIFFs); the channel axis is the last one if it has at most
        :data:`MAX_CHANNELS` entries, else the first. A 2-D image is its own channel 0.
    channel : int or None
        Which channel (0-based); ``None`` returns ``image`` as it is.

    Returns
    -------
    numpy.ndarray
        ``(H, W)``, same dtype.

    Raises
    ------
    ValueError
        If ``channel`` is not a non-negative integer, the image has no such channel, or
        neither its first nor its last axis looks like a channel axis.
    """
    image = np.asarray(image)
    if channel is None:
        return image
    if isinstance(channel, bool) or not isinstance(channel, (int, np.integer)) or channel < 0:
        raise ValueError(f"channel must be a non-negative integer, got {channel!r}")
    if image.ndim == 2:
        if channel != 0:
            raise ValueError(f"channel {channel} asked of a one-channel image {image.shape}")
        return image
    if image.ndim == 3 and image.shape[2] <= MAX_CHANNELS:
        axis = 2
    elif image.ndim == 3 and image.shape[0] <= MAX_CHANNELS:
        axis = 0
    else:
        raise ValueError(
            f"cannot tell the channel axis of an image of shape {image.shape}: expected "
            f"(H, W, C) or (C, H, W) with C <= {MAX_CHANNELS}"
        )
    if channel >= image.shape[axis]:
        raise ValueError(
            f"channel {channel} asked of an image with {image.shape[axis]} channels "
            f"(shape {image.shape}; channels are numbered from 0)"
        )
    return np.take(image, channel, axis=axis)


def normalize_image(image: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """Turn an image of any supported kind into the network's input.

    Grey images are repeated to three channels and alpha is dropped; intensities are
    scaled per image so that the ``low`` and ``high`` percentiles map to 0 and 1, which
    makes 8-bit, 16-bit, dim and bright images alike. In floating-point images, NaN and
    infinite pixels (the padding of a registered or stitched image, say) are left out of
    the percentiles and set to the ``low`` one, so they read as background.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)``; ``uint8``, ``uint16``
        or floating point.
    low, high : float, optional
        Percentiles mapped to 0 and 1.

    Returns
    -------
    numpy.ndarray
        ``(3, H, W)`` ``float32``, roughly in [0, 1].

    Raises
    ------
    ValueError
        If the shape or dtype is not an image's, the image is empty, no pixel is
        finite, or ``low`` and ``high`` are not percentiles with ``low < high``.
    """
    if not 0 <= low < high <= 100:  # False for NaN too
        raise ValueError(
            f"low and high must be percentiles with 0 <= low < high <= 100, got {low} and {high}"
        )
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] in (1, 3, 4):
        image = image[..., :3] if image.shape[2] >= 3 else image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
            f"got {image.shape}; for an image with other channels choose the nuclear one "
            f"(select_channel, or --channel on the command line); save a stack's planes "
            f"as images of their own"
        )
    if image.dtype == bool or not (
        np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)
    ):
        raise ValueError(f"unsupported image dtype {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"the image is empty (shape {image.shape})")
    x = image.astype(np.float32)
    step = max(1, int(math.sqrt(x.shape[0] * x.shape[1] / 65536)))
    sample = x[::step, ::step]
    finite = np.isfinite(x) if np.issubdtype(image.dtype, np.floating) else None
    if finite is not None and not finite.all():
        if not finite.any():
            raise ValueError("the image has no finite value: every pixel is NaN or infinite")
        sample = sample[finite[::step, ::step]]
        sample = sample if sample.size else x[finite]
    lo, hi = np.percentile(sample, (low, high))
    if hi - lo < 1e-6:
        hi = lo + 1.0
    if finite is not None:
        x = np.where(finite, x, lo)  # NaN and ±inf (e.g. padding) read as background
    x = (x - lo) / (hi - lo)
    return np.ascontiguousarray(np.clip(x, -0.5, 1.5).transpose(2, 0, 1), dtype=np.float32)


@dataclass(frozen=True)
class AugmentConfig:
    """Random crop, shift-scale-rotate, flips, gamma, brightness/contrast and illumination.

    Attributes
    ----------
    crop_size : int
        Side of the square crops.
    zoom : tuple of float
        Range of the zoom factor, sampled log-uniformly: 2 magnifies (nuclei look twice
        as large), 0.5 shrinks. Scale augmentation matters because users' nuclei come at
        other scales than the training data's.
    p_zoom : float
        Probability of a zoom other than 1.
    p_rotate : float
        Probability of a rotation by a uniform angle (else a multiple of 90°).
    flips : bool
        Random horizontal and vertical flips.
    brightness, contrast : float
        Half-widths of the uniform brightness shift and contrast factor around 1.
    p_intensity : float
        Probability of a brightness/contrast change.
    illumination : tuple of float
        Range of the amplitude of a smooth illumination field (a random 3×3 grid,
        bicubically upsampled to the crop and scaled to [0, 1]) added to the crop:
        positive adds a haze, negative a shading. ``(0, 0)``, the default, adds none and
        draws no random number. ``(-0.2, 0.5)``, which the ``cpu`` and ``full`` training
        profiles use (:data:`s2l_core.config.ILLUMINATION`), teaches the network that
        uneven illumination is not a nucleus (``benchmarks/results/variants/``).
    p_illumination : float
        Probability of an illumination field, when ``illumination`` is not ``(0, 0)``.
    gamma : tuple of float
        Range of a gamma correction, sampled log-uniformly and applied between the
        crop's own minimum and maximum: ``x -> lo + (hi - lo) * ((x - lo) / (hi - lo)) **
        g``. Values below 1 lift dim structures, above 1 press them down, so that the
        network has to judge by shape rather than by brightness — for images whose
        display curves differ, which a per-image linear normalisation does not undo.
        ``(1, 1)``, the default, changes nothing and draws no random number. Not in any
        profile: on BBBC038 fluorescence, where brightness is evidence, it lowered the
        test IoU (``benchmarks/results/variants/gamma_cpu.md``).
    p_gamma : float
        Probability of a gamma correction, when ``gamma`` is not ``(1, 1)``.
    blur : tuple of float
        Range of the standard deviation (pixels of the crop) of a Gaussian blur, sampled
        uniformly: out-of-focus images and other optics. ``(0, 0)``, the default, blurs
        nothing and draws no random number.
    p_blur : float
        Probability of a blur, when ``blur`` is not ``(0, 0)``.
    noise : tuple of float
        Range of the standard deviation of Gaussian pixel noise added to the normalised
        crop (whose background is near 0 and nuclei near 1), sampled uniformly: cameras
        and exposures other than the training data's. ``(0, 0)``, the default, adds none
        and draws no random number.
    p_noise : float
        Probability of noise, when ``noise`` is not ``(0, 0)``.
    """

    crop_size: int = 256
    zoom: tuple[float, float] = (0.6, 1.6)
    p_zoom: float = 0.7
    p_rotate: float = 0.7
    flips: bool = True
    brightness: float = 0.1
    contrast: float = 0.2
    p_intensity: float = 0.5
    illumination: tuple[float, float] = (0.0, 0.0)
    p_illumination: float = 0.5
    gamma: tuple[float, float] = (1.0, 1.0)
    p_gamma: float = 0.5
    blur: tuple[float, float] = (0.0, 0.0)
    p_blur: float = 0.3
    noise: tuple[float, float] = (0.0, 0.0)
    p_noise: float = 0.3

    def __post_init__(self) -> None:
        crop = whole_number("crop_size", self.crop_size, 1, unit="pixels")
        object.__setattr__(self, "crop_size", crop)
        ranges = (("zoom", 0.0, False), ("illumination", -math.inf, False))
        ranges += (("blur", 0.0, True), ("noise", 0.0, True))
        for name, lowest, closed in ranges:
            value = getattr(self, name)
            try:
                low, high = (float(v) for v in value)
            except (TypeError, ValueError):
                low, high = math.nan, math.nan
            above_lowest = lowest <= low if closed else lowest < low
            if not (above_lowest and low <= high < math.inf):  # False for NaN too
                above = f" with {'0 <=' if closed else '0 <'} low" if lowest == 0 else ""
                raise ValueError(
                    f"{name} must be a finite range (low, high){above} and low <= high, "
                    f"got {value!r}"
                )
            object.__setattr__(self, name, (low, high))
        for name, high in (("brightness", math.inf), ("contrast", 1.0)):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and 0 <= value < high):
                limit = "in [0, 1) (a contrast factor 1 ± contrast)" if high == 1 else ">= 0"
                raise ValueError(f"{name} must be a finite number {limit}, got {value!r}")
        try:
            gamma = tuple(float(g) for g in self.gamma)
        except (TypeError, ValueError):
            gamma = ()
        if len(gamma) != 2 or not 0 < gamma[0] <= gamma[1]:
            raise ValueError(
                f"gamma must be a range (low, high) with 0 < low <= high, got {self.gamma!r}"
            )
        object.__setattr__(self, "gamma", gamma)
        probabilities = ("p_zoom", "p_rotate", "p_intensity", "p_illumination", "p_gamma")
        for name in (*probabilities, "p_blur", "p_noise"):
            value = getattr(self, name)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and 0 <= value <= 1):
                raise ValueError(f"{name} is a probability and must lie in [0, 1], got {value!r}")

    def to_dict(self) -> dict:
        """Plain-type dict (for checkpoints)."""
        d = asdict(self)
        d["zoom"] = list(self.zoom)
        d["illumination"] = list(self.illumination)
        d["gamma"] = list(self.gamma)
        d["blur"] = list(self.blur)
        d["noise"] = list(self.noise)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> AugmentConfig:
        """Inverse of :meth:`to_dict` (older checkpoints lack the newer fields)."""
        d = {**d, "zoom": tuple(d["zoom"])}
        for key in ("illumination", "gamma", "blur", "noise"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


def _gamma(img: torch.Tensor, g: float) -> torch.Tensor:
    """Gamma-correct ``img`` between its own minimum and maximum (a flat crop is kept)."""
    lo, hi = img.min(), img.max()
    if hi - lo < 1e-6:
        return img
    return lo + (hi - lo) * ((img - lo) / (hi - lo)) ** g


def _blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of a ``(C, H, W)`` crop by ``sigma`` pixels (edges replicated)."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(img.dtype)
    c = img.shape[0]
    x = F.pad(img[None], (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x[0]


def _sampling_grid(
    shape: tuple[int, int], cfg: AugmentConfig, rng: np.random.Generator, augment: bool
) -> np.ndarray:
    """Input coordinates ``(S, S, 2)`` (y, x) of every crop pixel."""
    s = cfg.crop_size
    h, w = shape
    zoom, angle, fy, fx = 1.0, 0.0, 1.0, 1.0
    if augment:
        if rng.random() < cfg.p_zoom:
            zoom = float(np.exp(rng.uniform(np.log(cfg.zoom[0]), np.log(cfg.zoom[1]))))
        if rng.random() < cfg.p_rotate:
            angle = rng.uniform(0, 2 * np.pi)
        else:
            angle = rng.integers(4) * np.pi / 2
        if cfg.flips:
            fy, fx = rng.choice([-1.0, 1.0], size=2)
    footprint = s / zoom * (abs(np.cos(angle)) + abs(np.sin(angle)))
    centre = []
    for extent in (h, w):
        half = footprint / 2
        lo, hi = half, extent - half
        centre.append(rng.uniform(lo, hi) if hi > lo else extent / 2)
    offsets = (np.arange(s, dtype=np.float64) - (s - 1) / 2) / zoom
    u, v = np.meshgrid(offsets * fy, offsets * fx, indexing="ij")
    cos, sin = np.cos(angle), np.sin(angle)
    y = centre[0] - 0.5 + cos * u - sin * v
    x = centre[1] - 0.5 + sin * u + cos * v
    coords = np.stack([y, x], axis=-1)
    if zoom == 1.0 and np.isclose(np.sin(2 * angle), 0, atol=1e-9):
        coords = np.round(coords)  # a plain crop: take pixels as they are, no interpolation
    return coords


def _gather(image, scribble, ema, coords):
    """Exact crop for integer coordinates (plain crops, right angles, flips)."""
    h, w = scribble.shape
    yi, xi = coords[..., 0].astype(np.int64), coords[..., 1].astype(np.int64)
    inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
    yc, xc = np.clip(yi, 0, h - 1), np.clip(xi, 0, w - 1)
    img = torch.from_numpy(np.ascontiguousarray(image[:, yc, xc]))
    scr = torch.from_numpy(scribble[yc, xc].astype(np.int64))
    ema_crop = torch.from_numpy(
        ema[yc, xc].astype(np.float32) if ema is not None else np.zeros(yc.shape, np.float32)
    )
    valid = torch.from_numpy(inside)
    scr[~valid] = UNLABELLED
    img[:, ~valid] = 0
    return img, scr, ema_crop, valid


def _interpolate(image, scribble, ema, coords):
    """Crop at fractional coordinates: bilinear for image and EMA, nearest for labels."""
    h, w = scribble.shape
    y0 = int(max(np.floor(coords[..., 0].min()) - 1, 0))
    y1 = int(min(np.ceil(coords[..., 0].max()) + 2, h))
    x0 = int(max(np.floor(coords[..., 1].min()) - 1, 0))
    x1 = int(min(np.ceil(coords[..., 1].max()) + 2, w))
    if y1 <= y0 or x1 <= x0:  # pragma: no cover - the crop always overlaps the image
        y0, y1, x0, x1 = 0, h, 0, w
    window_ema = ema[y0:y1, x0:x1] if ema is not None else np.zeros((y1 - y0, x1 - x0))
    smooth = torch.from_numpy(
        np.concatenate([image[:, y0:y1, x0:x1], window_ema[None].astype(np.float32)])
    )
    hard = torch.from_numpy(
        np.stack(
            [scribble[y0:y1, x0:x1].astype(np.float32), np.ones((y1 - y0, x1 - x0), np.float32)]
        )
    )
    gy = 2 * (coords[..., 0] - y0) / max(y1 - y0 - 1, 1) - 1
    gx = 2 * (coords[..., 1] - x0) / max(x1 - x0 - 1, 1) - 1
    grid = torch.from_numpy(np.stack([gx, gy], axis=-1).astype(np.float32))[None]
    a = F.grid_sample(smooth[None], grid, mode="bilinear", align_corners=True)[0]
    b = F.grid_sample(hard[None], grid, mode="nearest", align_corners=True)[0]
    valid = b[1] > 0.5
    scr = b[0].round().to(torch.int64)
    scr[~valid] = UNLABELLED
    return a[:3], scr, a[3], valid


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int]) -> torch.Tensor:
    """A smooth random ``(H, W)`` field in [0, 1]: a 3×3 grid, upsampled bicubically."""
    grid = torch.from_numpy(rng.normal(size=(1, 1, 3, 3)).astype(np.float32))
    field = F.interpolate(grid, size=tuple(shape), mode="bicubic", align_corners=True)[0, 0]
    return (field - field.min()) / (field.max() - field.min() + 1e-6)


def random_crops(
    images: list[np.ndarray],
    scribbles: list[np.ndarray],
    emas: list[np.ndarray | None],
    rng: np.random.Generator,
    cfg: AugmentConfig,
    *,
    augment: bool = True,
) -> dict[str, torch.Tensor]:
    """Cut one augmented crop from each image, moving scribbles and EMA map along.

    Parameters
    ----------
    images : list of numpy.ndarray
        ``(3, H, W)`` ``float32`` images from :func:`normalize_image`.
    scribbles : list of numpy.ndarray
        ``(H, W)`` ``uint8`` scribbles (0, 1, 250) — or full masks for full supervision.
    emas : list of numpy.ndarray or None
        ``(H, W)`` ``float32`` EMA maps, or ``None`` (zeros).
    rng : numpy.random.Generator
        All random choices come from it.
    cfg : AugmentConfig
        The augmentation.
    augment : bool, optional
        ``False``: plain random crops, no transform.

    Returns
    -------
    dict of str to torch.Tensor
        ``image`` ``(N, 3, S, S)`` float32, ``scribble`` ``(N, S, S)`` int64 (250 outside
        the image), ``ema`` ``(N, S, S)`` float32, ``valid`` ``(N, S, S)`` bool.
    """
    out_img, out_scr, out_ema, out_valid = [], [], [], []
    for image, scribble, ema in zip(images, scribbles, emas, strict=True):
        h, w = scribble.shape
        coords = _sampling_grid((h, w), cfg, rng, augment)
        if np.array_equal(coords, np.round(coords)):
            img, scr, ema_crop, valid = _gather(image, scribble, ema, coords)
        else:
            img, scr, ema_crop, valid = _interpolate(image, scribble, ema, coords)
        if augment and cfg.gamma != (1.0, 1.0) and rng.random() < cfg.p_gamma:
            img = _gamma(img, float(np.exp(rng.uniform(*np.log(cfg.gamma)))))
        if augment and cfg.blur[1] > 0 and rng.random() < cfg.p_blur:
            sigma = float(rng.uniform(*cfg.blur))
            if sigma > 0:
                img = _blur(img, sigma)
        if augment and cfg.noise[1] > 0 and rng.random() < cfg.p_noise:
            std = float(rng.uniform(*cfg.noise))
            seed = int(rng.integers(2**31))
            noise = torch.randn(img.shape[-2:], generator=torch.Generator().manual_seed(seed))
            img = img + std * noise  # one field for the three (grey) channels
        if augment and rng.random() < cfg.p_intensity:
            c = 1 + rng.uniform(-cfg.contrast, cfg.contrast)
            shift = rng.uniform(-cfg.brightness, cfg.brightness)
            mean = img.mean()
            img = (img - mean) * c + mean + shift
        out_img.append(img)
        out_scr.append(scr)
        out_ema.append(ema_crop * valid)
        out_valid.append(valid)
    if augment and any(cfg.illumination):
        for k, img in enumerate(out_img):
            if rng.random() < cfg.p_illumination:
                field = _smooth_field(rng, img.shape[-2:])
                out_img[k] = img + rng.uniform(*cfg.illumination) * field
    return {
        "image": torch.stack(out_img).contiguous(),
        "scribble": torch.stack(out_scr),
        "ema": torch.stack(out_ema),
        "valid": torch.stack(out_valid),
    }


def crops_to_device(
    crops: dict[str, torch.Tensor], device: torch.device, channels_last: bool, with_ema: bool
) -> dict[str, torch.Tensor | None]:
    """A batch of :func:`random_crops` on ``device`` (pinned first on CUDA), as
    :func:`s2l_core.train.train_step` takes it: ``"ema"`` is ``None`` unless ``with_ema``."""
    pin = device.type == "cuda"
    batch = {
        k: v.pin_memory().to(device, non_blocking=True) if pin else v.to(device)
        for k, v in crops.items()
        if k in ("image", "scribble", "valid") or (k == "ema" and with_ema)
    }
    if channels_last:
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    batch.setdefault("ema", None)
    return batch
