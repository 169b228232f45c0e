"""Image normalisation and the joint augmentation of image, scribbles and EMA map.

Geometric augmentation moves the image, its scribbles and its EMA map together (one
sampling grid for all of them), so nothing has to be inverted afterwards. Wherever the
crop reaches outside the image, the returned ``valid`` mask is ``False`` and the
scribble is unlabelled (250) — never background.

A batch of crops is made in two steps: :func:`draw_crop_params` draws every random
choice from a numpy generator, then a renderer cuts the crops. :func:`random_crops` does
both, one crop at a time on the CPU (the reference, unchanged bit for bit);
:func:`render_crops` renders the same parameters as one batch on any device, from a
:class:`CropSource` that holds the training images there.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from s2l_core.checks import whole_number
from s2l_core.encoding import UNLABELLED

__all__ = [
    "MAX_CHANNELS",
    "AugmentConfig",
    "CropParams",
    "CropSource",
    "crops_to_device",
    "draw_crop_params",
    "normalize_image",
    "random_crops",
    "render_crops",
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


# ------------------------------------------------------------------ random parameters


@dataclass(frozen=True, eq=False)
class CropParams:
    """The random choices behind one batch of crops, as :func:`draw_crop_params` drew them.

    Crop pixel ``(i, j)`` (``0 <= i, j < crop_size``) is taken from image coordinates
    ``(y, x) = centre - 0.5 + R @ (fy * o_i, fx * o_j)``, where ``o = (k - (S - 1) / 2) /
    zoom`` and ``R = [[cos, -sin], [sin, cos]]``, computed in float64 in exactly this
    order (pixel ``(r, c)`` of the image covers ``[r, r + 1) x [c, c + 1)``). Where
    ``rounded``, the coordinates are rounded half to even to whole pixels and the crop
    takes pixels as they are; elsewhere image and EMA map are sampled bilinearly and the
    labels at the nearest pixel. The intensity steps then follow, per crop, in the order
    gamma, blur, noise, brightness/contrast; the illumination field is added last.

    Every array has one row per crop, in the batch's order; a step a crop does not take
    is marked as said below. Build it with :func:`draw_crop_params`, not by hand.

    Attributes
    ----------
    crop_size : int
        Side ``S`` of the square crops.
    shapes : numpy.ndarray
        ``(N, 2)`` ``int64``: ``(H, W)`` of the image each crop is cut from.
    zoom : numpy.ndarray
        ``(N,)`` ``float64`` zoom factors (1: none).
    cos, sin : numpy.ndarray
        ``(N,)`` ``float64``: cosine and sine of the rotation angle.
    flips : numpy.ndarray
        ``(N, 2)`` ``float64``: ``(fy, fx)``, each -1 (flipped) or 1.
    centre : numpy.ndarray
        ``(N, 2)`` ``float64``: ``(y, x)`` of the crop's centre in the image.
    rounded : numpy.ndarray
        ``(N,)`` ``bool``: zoom 1 and a right angle, so the coordinates are rounded.
    gamma : numpy.ndarray
        ``(N,)`` ``float64`` gamma; NaN: no gamma correction.
    blur : numpy.ndarray
        ``(N,)`` ``float64`` standard deviation of the blur; 0: no blur.
    noise_std : numpy.ndarray
        ``(N,)`` ``float64`` standard deviation of the noise (used where ``noise_seed``
        is not -1).
    noise_seed : numpy.ndarray
        ``(N,)`` ``int64`` seed of the ``torch.Generator`` (on the CPU) of the noise
        field; -1: no noise.
    contrast, brightness : numpy.ndarray
        ``(N,)`` ``float64`` contrast factor and brightness shift; NaN: no change.
    illumination : numpy.ndarray
        ``(N,)`` ``float64`` amplitude of the illumination field; NaN: none.
    illumination_grid : numpy.ndarray
        ``(N, 3, 3)`` ``float32``: the random grid the field is upsampled from (zeros
        where there is none).
    """

    crop_size: int
    shapes: np.ndarray
    zoom: np.ndarray
    cos: np.ndarray
    sin: np.ndarray
    flips: np.ndarray
    centre: np.ndarray
    rounded: np.ndarray
    gamma: np.ndarray
    blur: np.ndarray
    noise_std: np.ndarray
    noise_seed: np.ndarray
    contrast: np.ndarray
    brightness: np.ndarray
    illumination: np.ndarray
    illumination_grid: np.ndarray

    def __len__(self) -> int:
        return len(self.shapes)


def _check_shape(what: str, shape: object) -> tuple[int, int]:
    try:
        h, w = (operator.index(v) for v in shape)
    except (TypeError, ValueError):
        h = w = 0
    if h < 1 or w < 1:
        raise ValueError(
            f"{what} must be an image size (H, W) of whole numbers >= 1, got {shape!r}"
        )
    return h, w


def draw_crop_params(
    shapes: Sequence[tuple[int, int]],
    rng: np.random.Generator,
    cfg: AugmentConfig,
    *,
    augment: bool = True,
) -> CropParams:
    """Draw the random choices of a batch of crops, one per image size in ``shapes``.

    The numbers come from ``rng`` in the same order as :func:`random_crops` has always
    drawn them (per crop: zoom, angle, flips, centre, gamma, blur, noise, brightness/
    contrast; then per crop the illumination field), so that a generator in a given state
    leads to the same crops and leaves in the same state, whichever renderer follows:
    :func:`random_crops` (which calls this) or :func:`render_crops`.

    Parameters
    ----------
    shapes : sequence of (int, int)
        ``(H, W)`` of the image each crop is cut from (the crop's centre is drawn within
        it).
    rng : numpy.random.Generator
        All random choices come from it.
    cfg : AugmentConfig
        The augmentation.
    augment : bool, optional
        ``False``: plain random crops (only the centres are drawn).

    Returns
    -------
    CropParams

    Raises
    ------
    ValueError
        If a shape is not ``(H, W)`` with whole numbers >= 1.
    """
    sizes = [_check_shape(f"shapes[{k}]", shape) for k, shape in enumerate(shapes)]
    n, s = len(sizes), cfg.crop_size
    zooms, coss, sins = np.ones(n), np.ones(n), np.zeros(n)
    flips, centres, rounded = np.ones((n, 2)), np.zeros((n, 2)), np.zeros(n, bool)
    gammas, blurs = np.full(n, np.nan), np.zeros(n)
    noise_std, noise_seed = np.zeros(n), np.full(n, -1, np.int64)
    contrast, brightness = np.full(n, np.nan), np.zeros(n)
    amplitude, grids = np.full(n, np.nan), np.zeros((n, 3, 3), np.float32)
    for k, (h, w) in enumerate(sizes):
        # The geometry. The order of all these draws is what makes seeded runs and
        # resumed training reproducible: keep it.
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
        cos, sin = np.cos(angle), np.sin(angle)
        footprint = s / zoom * (abs(cos) + abs(sin))
        for axis, extent in enumerate((h, w)):
            half = footprint / 2
            lo, hi = half, extent - half
            centres[k, axis] = rng.uniform(lo, hi) if hi > lo else extent / 2
        zooms[k], coss[k], sins[k], flips[k] = zoom, cos, sin, (fy, fx)
        rounded[k] = zoom == 1.0 and np.isclose(np.sin(2 * angle), 0, atol=1e-9)
        # The intensity steps of this crop.
        if augment and cfg.gamma != (1.0, 1.0) and rng.random() < cfg.p_gamma:
            gammas[k] = float(np.exp(rng.uniform(*np.log(cfg.gamma))))
        if augment and cfg.blur[1] > 0 and rng.random() < cfg.p_blur:
            blurs[k] = float(rng.uniform(*cfg.blur))  # 0 (a range from 0): no blur
        if augment and cfg.noise[1] > 0 and rng.random() < cfg.p_noise:
            noise_std[k] = float(rng.uniform(*cfg.noise))
            noise_seed[k] = int(rng.integers(2**31))
        if augment and rng.random() < cfg.p_intensity:
            contrast[k] = 1 + rng.uniform(-cfg.contrast, cfg.contrast)
            brightness[k] = rng.uniform(-cfg.brightness, cfg.brightness)
    if augment and any(cfg.illumination):
        for k in range(n):
            if rng.random() < cfg.p_illumination:
                grids[k] = rng.normal(size=(1, 1, 3, 3)).astype(np.float32)[0, 0]
                amplitude[k] = rng.uniform(*cfg.illumination)
    return CropParams(
        crop_size=s,
        shapes=np.array(sizes, np.int64).reshape(n, 2),
        zoom=zooms,
        cos=coss,
        sin=sins,
        flips=flips,
        centre=centres,
        rounded=rounded,
        gamma=gammas,
        blur=blurs,
        noise_std=noise_std,
        noise_seed=noise_seed,
        contrast=contrast,
        brightness=brightness,
        illumination=amplitude,
        illumination_grid=grids,
    )


def _axis_terms(params: CropParams, k: int) -> tuple[np.ndarray, ...]:
    """``cos * fy * o``, ``sin * fx * o``, ``sin * fy * o``, ``cos * fx * o`` of crop ``k``:
    the four products the coordinates are sums of, rounded as the per-crop grid rounds them."""
    s = params.crop_size
    offsets = (np.arange(s, dtype=np.float64) - (s - 1) / 2) / params.zoom[k]
    fy, fx = params.flips[k]
    cos, sin = params.cos[k], params.sin[k]
    return cos * (offsets * fy), sin * (offsets * fx), sin * (offsets * fy), cos * (offsets * fx)


def _sampling_grid(params: CropParams, k: int) -> np.ndarray:
    """Input coordinates ``(S, S, 2)`` (y, x) of every pixel of crop ``k`` (float64)."""
    s = params.crop_size
    offsets = (np.arange(s, dtype=np.float64) - (s - 1) / 2) / params.zoom[k]
    fy, fx = params.flips[k]
    u, v = np.meshgrid(offsets * fy, offsets * fx, indexing="ij")
    cos, sin = params.cos[k], params.sin[k]
    cy, cx = params.centre[k]
    y = cy - 0.5 + cos * u - sin * v
    x = cx - 0.5 + sin * u + cos * v
    coords = np.stack([y, x], axis=-1)
    if params.rounded[k]:
        coords = np.round(coords)  # a plain crop: take pixels as they are, no interpolation
    return coords


# ------------------------------------------------------------------ rendering, one crop at a time


def _gamma(img: torch.Tensor, g: float) -> torch.Tensor:
    """Gamma-correct ``img`` between its own minimum and maximum (a flat crop is kept)."""
    lo, hi = img.min(), img.max()
    if hi - lo < 1e-6:
        return img
    return lo + (hi - lo) * ((img - lo) / (hi - lo)) ** g


def _blur_kernel(sigma: float) -> torch.Tensor:
    """The normalised 1-D Gaussian ``(2r + 1,)`` float32 of :func:`_blur`, ``r = ceil(3 sigma)``."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    return kernel / kernel.sum()


def _blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of a ``(C, H, W)`` crop by ``sigma`` pixels (edges replicated)."""
    kernel = _blur_kernel(sigma).to(img.dtype)
    radius = (len(kernel) - 1) // 2
    c = img.shape[0]
    x = F.pad(img[None], (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x[0]


def _noise_field(seed: int, size: int) -> torch.Tensor:
    """The ``(size, size)`` standard normal noise field of a seed (on the CPU)."""
    return torch.randn((size, size), generator=torch.Generator().manual_seed(int(seed)))


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


def _window(coords_min: tuple[float, float], coords_max: tuple[float, float], shape):
    """``(y0, y1, x0, x1)``: the part of an image bilinear sampling between the
    coordinates ``coords_min`` and ``coords_max`` (each ``(y, x)``) can touch."""
    h, w = shape
    y0 = int(max(np.floor(coords_min[0]) - 1, 0))
    y1 = int(min(np.ceil(coords_max[0]) + 2, h))
    x0 = int(max(np.floor(coords_min[1]) - 1, 0))
    x1 = int(min(np.ceil(coords_max[1]) + 2, w))
    if y1 <= y0 or x1 <= x0:  # pragma: no cover - the crop always overlaps the image
        y0, y1, x0, x1 = 0, h, 0, w
    return y0, y1, x0, x1


def _interpolate(image, scribble, ema, coords):
    """Crop at fractional coordinates: bilinear for image and EMA, nearest for labels."""
    h, w = scribble.shape
    lo = (coords[..., 0].min(), coords[..., 1].min())
    hi = (coords[..., 0].max(), coords[..., 1].max())
    y0, y1, x0, x1 = _window(lo, hi, (h, w))
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


def _smooth_field(grid: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """A smooth ``(H, W)`` field in [0, 1]: a 3×3 float32 grid, upsampled bicubically."""
    grid_t = torch.from_numpy(np.ascontiguousarray(grid, np.float32).reshape(1, 1, 3, 3))
    field = F.interpolate(grid_t, size=tuple(shape), mode="bicubic", align_corners=True)[0, 0]
    return (field - field.min()) / (field.max() - field.min() + 1e-6)


def _check_batch(images, scribbles, emas) -> None:
    if not len(images) == len(scribbles) == len(emas):
        raise ValueError(
            f"images, scribbles and emas must be as many, got {len(images)}, {len(scribbles)} "
            f"and {len(emas)}"
        )
    for k, (image, scribble, ema) in enumerate(zip(images, scribbles, emas, strict=True)):
        if np.ndim(scribble) != 2 or np.ndim(image) != 3 or image.shape[1:] != scribble.shape:
            raise ValueError(
                f"sample {k}: expected an image (C, H, W) and a scribble (H, W) of the same "
                f"size, got {np.shape(image)} and {np.shape(scribble)}"
            )
        if ema is not None and np.shape(ema) != scribble.shape:
            raise ValueError(
                f"sample {k}: the EMA map has shape {np.shape(ema)}, the scribble {scribble.shape}"
            )


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

    The reference renderer: one crop at a time, on the CPU, in float64 coordinates. It
    draws with :func:`draw_crop_params` and its output for a given generator state is
    the same, bit for bit, as before that split. :func:`render_crops` renders the same
    parameters as one batch on any device.

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
        the image), ``ema`` ``(N, S, S)`` float32 (0 outside the image), ``valid``
        ``(N, S, S)`` bool, all on the CPU.

    Raises
    ------
    ValueError
        If the lists differ in length or an image, its scribble and its EMA map differ in
        size.
    """
    _check_batch(images, scribbles, emas)
    params = draw_crop_params([s.shape for s in scribbles], rng, cfg, augment=augment)
    out_img, out_scr, out_ema, out_valid = [], [], [], []
    for k, (image, scribble, ema) in enumerate(zip(images, scribbles, emas, strict=True)):
        coords = _sampling_grid(params, k)
        if np.array_equal(coords, np.round(coords)):
            img, scr, ema_crop, valid = _gather(image, scribble, ema, coords)
        else:
            img, scr, ema_crop, valid = _interpolate(image, scribble, ema, coords)
        if not np.isnan(params.gamma[k]):
            img = _gamma(img, float(params.gamma[k]))
        if params.blur[k] > 0:
            img = _blur(img, float(params.blur[k]))
        if params.noise_seed[k] >= 0:
            noise = _noise_field(params.noise_seed[k], params.crop_size)
            img = img + float(params.noise_std[k]) * noise  # one field for the three channels
        if not np.isnan(params.contrast[k]):
            c, shift = float(params.contrast[k]), float(params.brightness[k])
            mean = img.mean()
            img = (img - mean) * c + mean + shift
        out_img.append(img)
        out_scr.append(scr)
        out_ema.append(ema_crop * valid)
        out_valid.append(valid)
    for k, img in enumerate(out_img):
        if not np.isnan(params.illumination[k]):
            field = _smooth_field(params.illumination_grid[k], img.shape[-2:])
            out_img[k] = img + float(params.illumination[k]) * field
    return {
        "image": torch.stack(out_img).contiguous(),
        "scribble": torch.stack(out_scr),
        "ema": torch.stack(out_ema),
        "valid": torch.stack(out_valid),
    }


# ------------------------------------------------------------------ rendering, a batch at once


def _float64_device(device: torch.device) -> torch.device:
    """Where to compute float64 coordinates: ``device``, unless it has no float64 (MPS)."""
    return torch.device("cpu") if device.type == "mps" else device


class CropSource:
    """Training images, scribbles and EMA maps held on a device for :func:`render_crops`.

    Made once per training run: the images and scribbles are copied to ``device`` here
    and never again; the EMA maps change with every EMA pass, so :meth:`set_ema` /
    :meth:`set_emas` replace them (a map that was never set reads as zeros). On the CPU
    the images and EMA maps are shared with the arrays given, not copied, where they are
    C-contiguous ``float32`` already.

    Parameters
    ----------
    images : sequence of numpy.ndarray or torch.Tensor
        ``(C, H, W)`` images (``float32`` from :func:`normalize_image`); every image has
        the same ``C``, sizes may differ.
    scribbles : sequence of numpy.ndarray or torch.Tensor
        ``(H, W)`` integer labels of the same sizes: scribbles (0, 1, 250) or full masks;
        values must lie in [0, 2**24 - 1] (they are held as float32).
    device : str or torch.device, optional
        Where the tensors live and the crops are rendered.
    emas : sequence of (numpy.ndarray or torch.Tensor or None), optional
        ``(H, W)`` EMA maps to start with; ``None`` (the default): none yet.

    Raises
    ------
    ValueError
        If the sequences differ in length or are empty, an image is not ``(C, H, W)`` with
        the same ``C`` as the first, or a scribble or EMA map differs in size from its
        image, or a label is out of range.

    Notes
    -----
    Memory on the device: ``4 * (C + 1) * H * W`` bytes per image, plus ``4 * H * W`` per
    EMA map (labels are held as float32, plus one, so that 0 marks the outside of the
    image in the resampling).
    """

    def __init__(
        self,
        images: Sequence[np.ndarray | torch.Tensor],
        scribbles: Sequence[np.ndarray | torch.Tensor],
        device: str | torch.device = "cpu",
        emas: Sequence[np.ndarray | torch.Tensor | None] | None = None,
    ) -> None:
        self.device = torch.device(device)
        if len(images) != len(scribbles) or not images:
            raise ValueError(
                f"a CropSource needs as many images as scribbles, at least one, got "
                f"{len(images)} and {len(scribbles)}"
            )
        self.images: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        channels = None
        for k, (image, scribble) in enumerate(zip(images, scribbles, strict=True)):
            image_t = self._tensor(image, torch.float32)
            if isinstance(scribble, np.ndarray) and scribble.dtype.kind in "ub":
                scribble = scribble.astype(np.int64) if scribble.dtype.itemsize > 1 else scribble
            scribble_t = torch.as_tensor(scribble)
            if image_t.ndim != 3 or scribble_t.shape != image_t.shape[1:]:
                raise ValueError(
                    f"image {k}: expected an image (C, H, W) and a scribble (H, W) of the same "
                    f"size, got {tuple(image_t.shape)} and {tuple(scribble_t.shape)}"
                )
            channels = image_t.shape[0] if channels is None else channels
            if image_t.shape[0] != channels:
                raise ValueError(
                    f"image {k} has {image_t.shape[0]} channels, the first {channels}: all "
                    f"images of a CropSource must have as many"
                )
            if scribble_t.dtype.is_floating_point or scribble_t.dtype.is_complex:
                raise ValueError(f"scribble {k} must be of an integer type, got {scribble_t.dtype}")
            if (
                scribble_t.numel()
                and not 0 <= int(scribble_t.min()) <= int(scribble_t.max()) < 2**24
            ):
                raise ValueError(f"scribble {k} has labels outside [0, 2**24 - 1]")
            self.images.append(image_t)
            self.labels.append(scribble_t.to(self.device).to(torch.float32) + 1)
        self.channels: int = int(channels)
        self.shapes: list[tuple[int, int]] = [tuple(t.shape[1:]) for t in self.images]
        self.emas: list[torch.Tensor | None] = [None] * len(self.images)
        self._buffers: dict[tuple, torch.Tensor] = {}
        if emas is not None:
            self.set_emas(emas)

    def _tensor(self, array: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(array, np.ndarray):
            with warnings.catch_warnings():
                # Read-only arrays (an EMA store's maps) are only ever read from here.
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                array = torch.from_numpy(np.ascontiguousarray(array))
        return array.to(self.device, dtype)

    def __len__(self) -> int:
        return len(self.images)

    def _workspace(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """A scratch tensor of ``shape`` (on ``device``, default the source's), not
        initialised, reused from call to call: fresh large allocations cost page faults
        on the CPU."""
        numel = math.prod(shape)
        device = self.device if device is None else device
        key = (name, dtype, device)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)

    def shape(self, index: int) -> tuple[int, int]:
        """``(H, W)`` of image ``index``."""
        return self.shapes[index]

    def set_ema(self, index: int, ema: np.ndarray | torch.Tensor | None) -> None:
        """Replace the EMA map of image ``index`` (``None``: zeros)."""
        if ema is None:
            self.emas[index] = None
            return
        ema_t = self._tensor(ema, torch.float32)
        if tuple(ema_t.shape) != self.shapes[index]:
            raise ValueError(
                f"the EMA map of image {index} has shape {tuple(ema_t.shape)}, the image "
                f"{self.shapes[index]}"
            )
        self.emas[index] = ema_t

    def set_emas(self, emas: Sequence[np.ndarray | torch.Tensor | None]) -> None:
        """Replace every EMA map (one per image, in order; ``None``: zeros)."""
        if len(emas) != len(self):
            raise ValueError(f"expected {len(self)} EMA maps, got {len(emas)}")
        for index, ema in enumerate(emas):
            self.set_ema(index, ema)


def _rows(image: torch.Tensor, rows: np.ndarray, n: int):
    """``image``'s rows ``rows`` and a function that writes new values back in place."""
    if len(rows) == n:
        return image, lambda new: image.copy_(new)
    index = torch.as_tensor(rows, device=image.device)
    return image.index_select(0, index), lambda new: image.index_copy_(0, index, new)


def _column(values: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).to(device)


def _intensity_batch(image: torch.Tensor, params: CropParams) -> None:
    """The intensity steps of :func:`random_crops`, batched, on ``image`` in place."""
    n, s, dev = len(params), params.crop_size, image.device
    rows = np.flatnonzero(~np.isnan(params.gamma))
    if rows.size:
        sub, put = _rows(image, rows, n)
        flat = sub.flatten(1)
        lo, hi = flat.amin(1).view(-1, 1, 1, 1), flat.amax(1).view(-1, 1, 1, 1)
        span = hi - lo
        bends = span >= 1e-6  # a flat crop is kept, as in _gamma
        ratio = (sub - lo) / torch.where(bends, span, torch.ones_like(span))
        put(torch.where(bends, lo + span * ratio ** _column(params.gamma[rows], dev), sub))
    rows = np.flatnonzero(params.blur > 0)
    if rows.size:
        sub, put = _rows(image, rows, n)
        kernels = [_blur_kernel(float(params.blur[k])) for k in rows]
        radius = max((len(kernel) - 1) // 2 for kernel in kernels)
        weights = torch.zeros(len(rows), 2 * radius + 1)
        for j, kernel in enumerate(kernels):  # a narrower kernel is padded with zeros
            r = (len(kernel) - 1) // 2
            weights[j, radius - r : radius + r + 1] = kernel
        c = sub.shape[1]
        weights = weights.to(dev, sub.dtype).repeat_interleave(c, 0)
        x = F.pad(sub.reshape(1, -1, s, s), (radius,) * 4, mode="replicate")
        x = F.conv2d(x, weights.view(-1, 1, 1, 2 * radius + 1), groups=len(rows) * c)
        x = F.conv2d(x, weights.view(-1, 1, 2 * radius + 1, 1), groups=len(rows) * c)
        put(x.view(sub.shape))
    rows = np.flatnonzero(params.noise_seed >= 0)
    if rows.size:
        sub, put = _rows(image, rows, n)
        fields = torch.stack([_noise_field(params.noise_seed[k], s) for k in rows])
        put(sub + _column(params.noise_std[rows], dev) * fields[:, None].to(dev))
    rows = np.flatnonzero(~np.isnan(params.contrast))
    if rows.size:
        sub, put = _rows(image, rows, n)
        mean = sub.mean(dim=(1, 2, 3), keepdim=True)
        c, shift = _column(params.contrast[rows], dev), _column(params.brightness[rows], dev)
        put((sub - mean) * c + mean + shift)
    rows = np.flatnonzero(~np.isnan(params.illumination))
    if rows.size:
        sub, put = _rows(image, rows, n)
        grids = torch.from_numpy(params.illumination_grid[rows][:, None]).to(dev)
        field = F.interpolate(grids, size=(s, s), mode="bicubic", align_corners=True)
        lo, hi = field.amin((2, 3), keepdim=True), field.amax((2, 3), keepdim=True)
        field = (field - lo) / (hi - lo + 1e-6)
        put(sub + _column(params.illumination[rows], dev) * field)


def render_crops(
    params: CropParams,
    source: CropSource,
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    with_ema: bool = True,
) -> dict[str, torch.Tensor]:
    """Render a batch of crops from drawn parameters, all at once, on the source's device.

    The batched counterpart of :func:`random_crops`: for the parameters that
    :func:`draw_crop_params` drew from a generator, it gives the crops that
    :func:`random_crops` gives from the same generator state —

    - labels (``scribble``, ``valid``) and pixels identical wherever the coordinates are
      whole numbers (plain crops, right angles, flips: gathered exactly, from the same
      float64 coordinates);
    - elsewhere (zoom, free rotation) image and EMA map sampled bilinearly with one
      ``grid_sample`` call for the batch and the labels at the nearest pixel with a
      second; both renderers pass float32 coordinates to ``grid_sample``, from the same
      float64 ones but relative to other windows, so pixels agree to about 1e-5 (a few
      1e-5 on steep edges of large images) and a label can differ only where a
      coordinate lies within about 1e-4 pixel of a tie between two pixels (measured:
      about one pixel in a million);
    - the intensity steps batched, with the same parameters (noise from the same seeds,
      made on the CPU): within float32 rounding of the per-crop results.

    Out-of-image pixels are unlabelled (250) and not valid, with 0 in the EMA map, as in
    :func:`random_crops`; the image is 0 there too, except that bilinear sampling fades
    it to 0 over the half pixel beyond the image's edge, as in :func:`random_crops`.

    Parameters
    ----------
    params : CropParams
        From :func:`draw_crop_params`, with the shapes of the images chosen.
    source : CropSource
        The images, scribbles and EMA maps, on the device to render on.
    indices : sequence of int, optional
        Which of the source's images crop ``k`` is cut from; default ``range(len(params))``
        (a source that holds just the batch).
    with_ema : bool, optional
        Resample the EMA maps; ``False``: ``ema`` is all zeros (as for ``None`` maps).

    Returns
    -------
    dict of str to torch.Tensor
        On ``source.device``: ``image`` ``(N, C, S, S)`` float32, ``scribble`` ``(N, S,
        S)`` int64 (250 outside the image), ``ema`` ``(N, S, S)`` float32 (0 outside the
        image), ``valid`` ``(N, S, S)`` bool; :func:`crops_to_device` takes it as it is.

    Raises
    ------
    ValueError
        If ``indices`` and ``params`` differ in length, an index is out of range, or an
        image's size is not the one the parameters were drawn for.
    """
    n, s = len(params), params.crop_size
    if indices is None:
        indices = range(n)
    index = [operator.index(i) for i in indices]
    if len(index) != n:
        raise ValueError(f"{len(index)} indices for {n} crops")
    for k, i in enumerate(index):
        if not 0 <= i < len(source):
            raise ValueError(f"index {i} out of range for a CropSource of {len(source)} images")
        drawn = tuple(params.shapes[k].tolist())
        if source.shapes[i] != drawn:
            raise ValueError(
                f"crop {k} was drawn for an image of size {drawn}, but "
                f"image {i} of the source is {source.shapes[i]}"
            )
    dev, c, e = source.device, source.channels, int(with_ema)
    gdev = _float64_device(dev)
    # Coordinates y = (cy - 0.5 + cos fy o_i) - sin fx o_j and x = (cx - 0.5 + sin fy o_i)
    # + cos fx o_j, in float64 and in the per-crop order (the sums along i here, the last
    # one on the device), so that every value is the one random_crops computes.
    terms = [_axis_terms(params, k) for k in range(n)]
    row_y = np.stack([params.centre[k, 0] - 0.5 + t[0] for k, t in enumerate(terms)])
    col_y = np.stack([t[1] for t in terms])
    row_x = np.stack([params.centre[k, 1] - 0.5 + t[2] for k, t in enumerate(terms)])
    col_x = np.stack([t[3] for t in terms])
    # Bounds of each crop's coordinates (exact: rounding is monotonic), and the window of
    # its image that sampling can touch.
    lo = np.stack([row_y.min(1) - col_y.max(1), row_x.min(1) + col_x.min(1)], 1)
    hi = np.stack([row_y.max(1) - col_y.min(1), row_x.max(1) + col_x.max(1)], 1)
    windows = np.array([_window(lo[k], hi[k], params.shapes[k]) for k in range(n)])
    # Crops on whole pixels are gathered exactly: the rounded ones, and any other whose
    # coordinates happen to be whole (as random_crops decides; in practice never).
    exact = params.rounded.copy()
    a = min(1, s - 1)
    for k in np.flatnonzero(~exact):
        some = [row_y[k, i] - col_y[k, j] for i, j in ((0, 0), (0, a), (a, 0))]
        some += [row_x[k, i] + col_x[k, j] for i, j in ((0, 0), (0, a), (a, 0))]
        if all(v == np.round(v) for v in some):
            y, x = _device_coords(row_y[[k]], col_y[[k]], row_x[[k]], col_x[[k]], gdev)
            exact[k] = bool(torch.equal(y, y.round()) and torch.equal(x, x.round()))
    frac, whole = np.flatnonzero(~exact), np.flatnonzero(exact)
    order, nf = np.concatenate([frac, whole]), len(frac)
    # One canvas for the batch, in that order: each crop's window at the top left;
    # channels: image, EMA map (with_ema), labels + 1 (0 outside the image).
    hc = int((windows[:, 1] - windows[:, 0]).max())
    wc = int((windows[:, 3] - windows[:, 2]).max())
    canvas = source._workspace("canvas", (n, c + e + 1, hc, wc), torch.float32)
    if dev.type != "cpu":
        canvas.zero_()  # one fill; on the CPU, only what is read is written (below)
    for r, k in enumerate(order):
        i, (y0, y1, x0, x1) = index[k], windows[k]
        h, w = y1 - y0, x1 - x0
        canvas[r, :c, :h, :w] = source.images[i][:, y0:y1, x0:x1]
        if with_ema:
            ema = source.emas[i]
            canvas[r, c, :h, :w] = 0 if ema is None else ema[y0:y1, x0:x1]
        canvas[r, c + e, :h, :w] = source.labels[i][y0:y1, x0:x1]
        if r < nf and dev.type == "cpu":  # zero what bilinear sampling may read beyond
            rows = min(hc, int(np.floor(hi[k, 0])) - y0 + 3)  # the window, nothing more
            cols = min(wc, int(np.floor(hi[k, 1])) - x0 + 3)
            canvas[r, :, h:rows, :cols] = 0
            canvas[r, :, :h, w:cols] = 0
    image = torch.empty((n, c, s, s), device=dev)
    scribble = torch.empty((n, s, s), dtype=torch.int64, device=dev)
    ema = torch.empty((n, s, s), device=dev) if with_ema else None
    valid = torch.empty((n, s, s), dtype=torch.bool, device=dev)

    def put(rows: np.ndarray, *values: torch.Tensor | None) -> None:
        if len(rows) == n:  # the whole batch, in order
            for out, value in zip((image, ema, scribble, valid), values, strict=True):
                if out is not None:
                    out.copy_(value)
            return
        at = torch.from_numpy(rows).to(dev)
        for out, value in zip((image, ema, scribble, valid), values, strict=True):
            if out is not None:
                out.index_copy_(0, at, value)

    if nf:
        # One bilinear and one nearest grid_sample for the batch, at the float64
        # coordinates made relative to each window and rounded to float32 only here.
        origin = windows[frac][:, [0, 2]].astype(np.float64)
        scale_y, scale_x = 2 / max(hc - 1, 1), 2 / max(wc - 1, 1)
        grid = source._workspace("grid", (nf, s, s, 2), torch.float32)
        for axis, along_i, along_j, scale in (
            (1, row_y, -col_y, scale_y),
            (0, row_x, col_x, scale_x),
        ):
            along_i = (along_i[frac] - origin[:, 1 - axis, None]) * scale - 1
            along_i_t = torch.from_numpy(along_i).to(gdev)[:, :, None]
            along_j_t = torch.from_numpy(along_j[frac] * scale).to(gdev)[:, None]
            total = source._workspace("sum", (nf, s, s), torch.float64, gdev)
            grid[..., axis] = torch.add(along_i_t, along_j_t, out=total)  # float64, then float32
        smooth = F.grid_sample(canvas[:nf, : c + e], grid, mode="bilinear", align_corners=True)
        hard = F.grid_sample(canvas[:nf, c + e :], grid, mode="nearest", align_corners=True)
        hard = hard[:, 0]
        inside = hard > 0.5
        labels = (hard.to(torch.int64) - 1).masked_fill_(~inside, UNLABELLED)
        put(frac, smooth[:, :c], smooth[:, c] if with_ema else None, labels, inside)
    if len(whole):
        # Rounded half to even like numpy (a no-op for the crops whole without it), then
        # clamped into the image and made relative to the window, all in float64 (exact
        # for whole numbers) so as to make few temporaries.
        y, x = _device_coords(row_y[whole], col_y[whole], row_x[whole], col_x[whole], gdev)
        y, x = y.round_(), x.round_()
        size = torch.from_numpy(params.shapes[whole].astype(np.float64)).to(gdev)
        h, w = size[:, 0, None, None], size[:, 1, None, None]
        inside = ((y >= 0) & (y < h) & (x >= 0) & (x < w)).to(dev)
        origin = torch.from_numpy(windows[whole][:, [0, 2]].astype(np.float64)).to(gdev)
        y = torch.clamp_(y, min=torch.zeros_like(h), max=h - 1).sub_(origin[:, 0, None, None])
        x = torch.clamp_(x, min=torch.zeros_like(w), max=w - 1).sub_(origin[:, 1, None, None])
        flat = y.mul_(wc).add_(x).flatten(1).to(dev, torch.int64)
        rows = canvas[nf:].flatten(2)
        got = rows.gather(2, flat[:, None].expand(-1, rows.shape[1], -1))
        got = got.view(len(whole), -1, s, s)
        labels = got[:, -1].sub_(1).to(torch.int64).masked_fill_(~inside, UNLABELLED)
        pixels = got[:, :c].masked_fill_(~inside[:, None], 0)
        put(whole, pixels, got[:, c] if with_ema else None, labels, inside)
    _intensity_batch(image, params)
    ema = ema.mul_(valid) if ema is not None else torch.zeros((n, s, s), device=dev)
    return {"image": image, "scribble": scribble, "ema": ema, "valid": valid}


def _device_coords(row_y, col_y, row_x, col_x, device: torch.device):
    """Float64 ``y = row_y[:, i] - col_y[:, j]`` and ``x = row_x[:, i] + col_x[:, j]``."""
    ry, cy, rx, cx = (
        torch.from_numpy(np.ascontiguousarray(v)).to(device) for v in (row_y, col_y, row_x, col_x)
    )
    return ry[:, :, None] - cy[:, None], rx[:, :, None] + cx[:, None]


def crops_to_device(
    crops: dict[str, torch.Tensor], device: torch.device, channels_last: bool, with_ema: bool
) -> dict[str, torch.Tensor | None]:
    """A batch of :func:`random_crops` or :func:`render_crops` on ``device`` (CPU tensors
    are pinned first on CUDA; tensors already there are not copied), as
    :func:`s2l_core.train.train_step` takes it: ``"ema"`` is ``None`` unless ``with_ema``."""
    device = torch.device(device)

    def move(v: torch.Tensor) -> torch.Tensor:
        if device.type == "cuda" and v.device.type == "cpu":
            return v.pin_memory().to(device, non_blocking=True)
        return v.to(device)

    batch = {
        k: move(v)
        for k, v in crops.items()
        if k in ("image", "scribble", "valid") or (k == "ema" and with_ema)
    }
    if channels_last:
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    batch.setdefault("ema", None)
    return batch
