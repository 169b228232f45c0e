"""The segmentation network: a U-Net built for speed on a CPU.

Scribble2Label trains a U-Net with two output classes (background, foreground) on random
256×256 crops. The original uses a ResNet-50 encoder with ImageNet
weights; on machines without internet, and on a CPU, a network trained from scratch has
to serve. This module holds that network, :class:`UNet`, and an optional adapter,
:func:`build_smp_unet`, for the paper's network from ``segmentation_models_pytorch``.

Design (speed is the goal)
--------------------------
On a CPU, a plain U-Net spends most of its time in its full-resolution stages: two
3×3 convolutions, two normalisations and two activations on every pixel in the encoder
and as many again in the decoder, all of them limited by memory traffic more than by
arithmetic. :class:`UNet` does no convolution at full resolution:

* **Space-to-depth stem.** The input is rearranged losslessly into 2×2 blocks
  (:class:`torch.nn.PixelUnshuffle`): an ``(N, 3, H, W)`` image becomes an
  ``(N, 12, H/2, W/2)`` tensor, and the U-Net proper works from half resolution on.
  No pixel is discarded, so the network still sees every detail of the input.
* **Upsampling on the logits.** The last decoder stage (half resolution) ends in the
  1×1 head convolution to 2 channels, and only these logits are interpolated
  (bilinear) to full resolution ``(N, 2, H, W)``: the cheapest place for the last
  upsampling, and a smooth one, which suits the round outlines of nuclei. The
  alternative ``head_upsample="shuffle"`` predicts ``2 · 2 · 2`` channels and
  rearranges them into 2×2 output blocks (:class:`torch.nn.PixelShuffle`, a learned
  sub-pixel upsampling) at the same cost, and learned less well in a short comparison.
* **Transposed-convolution upsampling** (2×2, stride 2, as in the original U-Net) in the
  decoder, faster than nearest-neighbour upsampling followed by a wider convolution.
* **Channels-last memory format** (:func:`prepare_model`): oneDNN's convolutions run
  faster on NHWC tensors.

With ``stem_factor=1`` the same class is a plain U-Net (the reference configuration
``UNet(base_channels=16, stem_factor=1)``).

Normalisation: batch norm by default. With batches of 16 or more crops of 256×256,
each channel's statistics are taken over a million values, so they are stable; batch
norm is the original's choice, faster than group norm, and folds into the convolution at
inference. ``norm="group"`` is there for very small batches. torch.compile
(:func:`prepare_model` with ``compile=True``) is off by default: on a CPU it gave no gain
for a minute of compilation.

Default configuration
---------------------
``UNet()``: 3 input channels, 2 classes, space-to-depth 2, depth 4 (four 2× down-steps
after the stem, so :attr:`UNet.size_multiple` is 32), widths 24, 48, 96, 192, 256
(doubling from ``base_channels=24``, capped at ``max_channels=256``), batch norm: about
3.3 million parameters, 1.7 GMAC per 256×256 crop (a plain 16-channel U-Net: 1.9 million
parameters, 3.0 GMAC, spent mostly at full resolution). Its training speed and memory
on a CPU, in float32 and bfloat16, beside the plain U-Net's:
``benchmarks/results/speed/model.json``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

__all__ = [
    "ConvBlock",
    "SMPUNet",
    "UNet",
    "build_smp_unet",
    "count_parameters",
    "from_config",
    "parameter_groups",
    "prepare_model",
]

_NORMS = ("batch", "group", "none")
_HEAD_UPSAMPLES = ("bilinear", "shuffle")


def _num_groups(channels: int) -> int:
    """Number of groups for group norm: the largest of 8, 4, 2, 1 dividing ``channels``."""
    for groups in (8, 4, 2):
        if channels % groups == 0:
            return groups
    return 1


def _norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(_num_groups(channels), channels)
    return nn.Identity()


class ConvBlock(nn.Sequential):
    """Two 3×3 convolutions, each followed by normalisation and ReLU.

    Parameters
    ----------
    in_channels : int
        Channels of the input.
    out_channels : int
        Channels of both convolutions' outputs.
    norm : {"batch", "group", "none"}
        Normalisation after each convolution. The convolutions have no bias when a
        normalisation follows them.

    Notes
    -----
    Input ``(N, in_channels, H, W)`` float32, output ``(N, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch") -> None:
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias),
            _norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias),
            _norm_layer(norm, out_channels),
            nn.ReLU(inplace=True),
        )


class _Rebuildable:
    """A network that knows the arguments it was built with (``_config``, with
    ``"arch"``), so that :func:`from_config` can build it again."""

    _config: dict[str, Any]

    @property
    def config(self) -> dict[str, Any]:
        """The arguments it was built with (and ``"arch"``), JSON-serialisable."""
        return dict(self._config)

    def to_config(self) -> dict[str, Any]:
        """Return :attr:`config`: what :func:`from_config` needs to rebuild this network."""
        return self.config


class UNet(_Rebuildable, nn.Module):
    """U-Net with a space-to-depth stem and upsampling on the logits (fast on a CPU).

    Parameters
    ----------
    in_channels : int, default 3
        Channels of the input image (3 for RGB, 1 for grey).
    num_classes : int, default 2
        Output channels (logits); Scribble2Label uses 2, background and foreground.
    base_channels : int, default 24
        Width of the first (highest-resolution) level; each down-step doubles it.
    depth : int, default 4
        Number of 2× down-steps after the stem (the U-Net has ``depth + 1`` levels).
    stem_factor : int, default 2
        Space-to-depth factor of the stem: the first level works at
        ``1 / stem_factor`` of the input resolution. 1 gives a plain U-Net.
    max_channels : int or None, default 256
        Cap on the width of any level (``None``: no cap).
    norm : {"batch", "group", "none"}, default "batch"
        Normalisation in every convolution block.
    head_upsample : {"bilinear", "shuffle"}, default "bilinear"
        How the head returns from ``1 / stem_factor`` to full resolution: "shuffle"
        predicts ``num_classes · stem_factor²`` channels and rearranges them
        (:class:`torch.nn.PixelShuffle`); "bilinear" predicts ``num_classes`` channels
        and interpolates the logits. Ignored when ``stem_factor`` is 1.

    Attributes
    ----------
    widths : tuple of int
        Width of each level, from the highest resolution to the bottleneck.
    size_multiple : int
        Input height and width must be multiples of this
        (``stem_factor · 2**depth``; 32 by default). Pad the input to it.
    encoder, ups, decoder : torch.nn.ModuleList
        The convolution blocks of the contracting path, the transposed convolutions
        and the convolution blocks of the expanding path.
    head : torch.nn.Conv2d
        The final 1×1 convolution to the logits.

    Notes
    -----
    Forward: input ``(N, in_channels, H, W)`` float32 with ``H`` and ``W`` multiples
    of :attr:`size_multiple`; output: logits ``(N, num_classes, H, W)`` float32 (apply
    softmax for probabilities). Works with contiguous and channels-last tensors.

    Examples
    --------
    >>> model = UNet()
    >>> model(torch.zeros(2, 3, 64, 96)).shape
    torch.Size([2, 2, 64, 96])
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 2,
        base_channels: int = 24,
        depth: int = 4,
        stem_factor: int = 2,
        max_channels: int | None = 256,
        norm: str = "batch",
        head_upsample: str = "bilinear",
    ) -> None:
        super().__init__()
        for name, value in [
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("base_channels", base_channels),
            ("stem_factor", stem_factor),
        ]:
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if int(depth) != depth or depth < 0:
            raise ValueError(f"depth must be a non-negative integer, got {depth!r}")
        if max_channels is not None and max_channels < 1:
            raise ValueError(f"max_channels must be positive or None, got {max_channels!r}")
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
        if head_upsample not in _HEAD_UPSAMPLES:
            raise ValueError(
                f"head_upsample must be one of {_HEAD_UPSAMPLES}, got {head_upsample!r}"
            )
        self._config = {
            "arch": "unet",
            "in_channels": int(in_channels),
            "num_classes": int(num_classes),
            "base_channels": int(base_channels),
            "depth": int(depth),
            "stem_factor": int(stem_factor),
            "max_channels": None if max_channels is None else int(max_channels),
            "norm": norm,
            "head_upsample": head_upsample,
        }
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.stem_factor = int(stem_factor)
        self.depth = int(depth)
        cap = max_channels if max_channels is not None else float("inf")
        self.widths = tuple(int(min(base_channels * 2**i, cap)) for i in range(depth + 1))

        # Space-to-depth: (N, C, H, W) -> (N, C * s², H / s, W / s); no parameters.
        self.stem = nn.PixelUnshuffle(stem_factor) if stem_factor > 1 else nn.Identity()
        self.pool = nn.MaxPool2d(2)

        self.encoder = nn.ModuleList()
        channels = in_channels * stem_factor**2
        for width in self.widths:
            self.encoder.append(ConvBlock(channels, width, norm))
            channels = width

        self.ups = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for width in reversed(self.widths[:-1]):
            self.ups.append(nn.ConvTranspose2d(channels, width, kernel_size=2, stride=2))
            self.decoder.append(ConvBlock(2 * width, width, norm))
            channels = width

        self._shuffle = stem_factor > 1 and head_upsample == "shuffle"
        head_out = num_classes * stem_factor**2 if self._shuffle else num_classes
        self.head = nn.Conv2d(channels, head_out, kernel_size=1)
        if self._shuffle:
            self.upsample = nn.PixelShuffle(stem_factor)
        elif stem_factor > 1:
            self.upsample = nn.Upsample(
                scale_factor=stem_factor, mode="bilinear", align_corners=False
            )
        else:
            self.upsample = nn.Identity()

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this (``stem_factor · 2**depth``)."""
        return self.stem_factor * 2**self.depth

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of the contracting path (the stem has none)."""
        return list(self.encoder.parameters())

    def decoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of the expanding path: transposed convolutions and blocks."""
        return list(self.ups.parameters()) + list(self.decoder.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the final 1×1 output convolution."""
        return list(self.head.parameters())

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"expected a 4-d input (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected {self.in_channels} input channel(s), got {x.shape[1]} "
                f"(input shape {tuple(x.shape)}); build the model with "
                f"in_channels={x.shape[1]} or convert the image"
            )
        height, width = x.shape[-2:]
        multiple = self.size_multiple
        if height % multiple or width % multiple:
            raise ValueError(
                f"input height and width must be multiples of model.size_multiple = "
                f"{multiple}, got {height}×{width}; pad the input (e.g. to "
                f"{-(-height // multiple) * multiple}×{-(-width // multiple) * multiple})"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute the logits.

        Parameters
        ----------
        x : torch.Tensor
            Images, shape ``(N, in_channels, H, W)``, float32, ``H`` and ``W``
            multiples of :attr:`size_multiple`.

        Returns
        -------
        torch.Tensor
            Logits, shape ``(N, num_classes, H, W)``, float32.

        Raises
        ------
        ValueError
            If the input is not 4-d, has the wrong number of channels, or its height
            or width is not a multiple of :attr:`size_multiple`.
        """
        self._check_input(x)
        x = self.stem(x)
        skips = []
        for level, block in enumerate(self.encoder):
            if level:
                x = self.pool(x)
            x = block(x)
            skips.append(x)
        skips.pop()  # the bottleneck output is x itself
        for up, block in zip(self.ups, self.decoder, strict=True):
            x = block(torch.cat([up(x), skips.pop()], dim=1))
        return self.upsample(self.head(x))


class SMPUNet(_Rebuildable, nn.Module):
    """Wrapper around a ``segmentation_models_pytorch.Unet`` with this module's interface.

    Build it with :func:`build_smp_unet`. It exposes the same methods as :class:`UNet`
    (:meth:`encoder_parameters`, :meth:`decoder_parameters`, :meth:`head_parameters`,
    :attr:`size_multiple`, :attr:`in_channels`, :attr:`config`, :meth:`to_config`).

    Parameters
    ----------
    net : torch.nn.Module
        A ``segmentation_models_pytorch.Unet`` (with ``encoder``, ``decoder`` and
        ``segmentation_head`` attributes).
    config : dict
        The arguments of :func:`build_smp_unet` that built ``net``.
    size_multiple : int, default 32
        Input height and width must be multiples of this (``2**encoder_depth``).

    Notes
    -----
    Forward: ``(N, in_channels, H, W)`` float32 → logits ``(N, classes, H, W)``.
    """

    def __init__(self, net: nn.Module, config: dict[str, Any], size_multiple: int = 32) -> None:
        super().__init__()
        self.net = net
        self._config = dict(config)
        self._size_multiple = int(size_multiple)

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return self._size_multiple

    @property
    def in_channels(self) -> int:
        """Input channels, as :attr:`UNet.in_channels`."""
        return int(self._config.get("in_channels", 3))

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of the (ResNet) encoder."""
        return list(self.net.encoder.parameters())

    def decoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of the U-Net decoder (with its scSE attention)."""
        return list(self.net.decoder.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the segmentation head (and the classification head, if any)."""
        params = list(self.net.segmentation_head.parameters())
        classification_head = getattr(self.net, "classification_head", None)
        if classification_head is not None:
            params += list(classification_head.parameters())
        return params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute the logits, ``(N, classes, H, W)`` float32, of ``x`` ``(N, C, H, W)``."""
        height, width = x.shape[-2:]
        if height % self.size_multiple or width % self.size_multiple:
            raise ValueError(
                f"input height and width must be multiples of model.size_multiple = "
                f"{self.size_multiple}, got {height}×{width}; pad the input"
            )
        return self.net(x)


def build_smp_unet(
    encoder_name: str = "resnet50",
    encoder_weights: str | None = None,
    in_channels: int = 3,
    classes: int = 2,
    decoder_attention_type: str | None = "scse",
    encoder_depth: int = 5,
) -> SMPUNet:
    """Build the paper's network, a ``segmentation_models_pytorch`` U-Net, wrapped.

    The original Scribble2Label uses ``smp.Unet("resnet50", encoder_weights="imagenet",
    decoder_attention_type="scse", classes=2)``. The package is optional and imported
    only here.

    Parameters
    ----------
    encoder_name : str, default "resnet50"
        The smp encoder.
    encoder_weights : str or None, default None
        Pretrained encoder weights, e.g. ``"imagenet"`` as in the paper (this downloads
        them); ``None`` trains from scratch and needs no internet.
    in_channels : int, default 3
        Input channels.
    classes : int, default 2
        Output channels (logits).
    decoder_attention_type : str or None, default "scse"
        Attention in the decoder blocks (the paper: spatial and channel
        squeeze-and-excitation).
    encoder_depth : int, default 5
        Number of encoder stages; inputs must be multiples of ``2**encoder_depth``.

    Returns
    -------
    SMPUNet
        The wrapped network, with the same parameter-group methods as :class:`UNet`.

    Raises
    ------
    ImportError
        If ``segmentation_models_pytorch`` is not installed.
    """
    try:
        import segmentation_models_pytorch as smp
    except ImportError as err:
        raise ImportError(
            "build_smp_unet needs the optional package 'segmentation_models_pytorch' "
            "(pip install segmentation-models-pytorch), which is not installed. "
            "The built-in s2l_core.model.UNet needs nothing extra."
        ) from err
    net = smp.Unet(
        encoder_name=encoder_name,
        encoder_weights=encoder_weights,
        in_channels=in_channels,
        classes=classes,
        decoder_attention_type=decoder_attention_type,
        encoder_depth=encoder_depth,
    )
    config = {
        "arch": "smp_unet",
        "encoder_name": encoder_name,
        "encoder_weights": encoder_weights,
        "in_channels": in_channels,
        "classes": classes,
        "decoder_attention_type": decoder_attention_type,
        "encoder_depth": encoder_depth,
    }
    return SMPUNet(net, config, size_multiple=2**encoder_depth)


def from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuild a network from its :meth:`UNet.to_config` (or :meth:`SMPUNet.to_config`).

    The network has fresh weights: load the checkpoint's ``state_dict`` into it. For an
    ``"smp_unet"`` configuration no pretrained weights are fetched
    (``encoder_weights`` is set to ``None``), since the checkpoint supplies them.

    Parameters
    ----------
    config : dict
        The configuration; its ``"arch"`` key (``"unet"`` when absent) selects the class.

    Returns
    -------
    UNet or SMPUNet
        The network, in training mode, on the CPU.

    Raises
    ------
    ValueError
        If the configuration is not a dict, the architecture is unknown, an argument is
        not accepted, or the optional package an architecture needs is missing.
    """
    if not isinstance(config, dict):
        raise ValueError(f"a network configuration is a dict, got {type(config).__name__}")
    cfg = dict(config)
    arch = cfg.pop("arch", "unet")
    if arch == "unet":
        builder: Any = UNet
    elif arch == "smp_unet":
        builder = build_smp_unet
        cfg["encoder_weights"] = None
    else:
        raise ValueError(f"unknown architecture {arch!r}; expected 'unet' or 'smp_unet'")
    try:
        return builder(**cfg)
    except TypeError as err:
        raise ValueError(f"invalid configuration for {arch!r}: {err}") from err
    except ImportError as err:  # an optional package: its message says how to install it
        raise ValueError(str(err)) from None


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter values (scalars) in ``model``.

    Parameters
    ----------
    model : torch.nn.Module
        The network.
    trainable_only : bool, default False
        Count only parameters with ``requires_grad``.

    Returns
    -------
    int
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _unique(params: Iterable[nn.Parameter]) -> Iterator[nn.Parameter]:
    seen: set[int] = set()
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def parameter_groups(
    model: nn.Module,
    encoder_lr: float = 3e-4,
    decoder_lr: float = 3e-3,
    head_lr: float | None = None,
    train_head: bool = True,
) -> list[dict[str, Any]]:
    """Optimiser parameter groups with the original's learning rates.

    Parameters
    ----------
    model : UNet or SMPUNet
        A network with ``encoder_parameters``, ``decoder_parameters`` and
        ``head_parameters`` methods.
    encoder_lr : float, default 3e-4
        Learning rate of the encoder.
    decoder_lr : float, default 3e-3
        Learning rate of the decoder.
    head_lr : float or None, default None
        Learning rate of the head (``None``: the decoder's).
    train_head : bool, default True
        ``False`` reproduces the original's defect: the head is left out of the
        optimiser and frozen (``requires_grad=False``) at its random initialisation.

    Returns
    -------
    list of dict
        ``[{"name": "encoder", "params": [...], "lr": ...}, {"name": "decoder", ...},
        {"name": "head", ...}]`` (no head group when ``train_head`` is ``False``), ready
        for ``torch.optim.RAdam(groups, ...)``.
    """
    head = list(_unique(model.head_parameters()))
    for p in head:
        p.requires_grad_(train_head)
    groups = [
        {"name": "encoder", "params": list(_unique(model.encoder_parameters())), "lr": encoder_lr},
        {"name": "decoder", "params": list(_unique(model.decoder_parameters())), "lr": decoder_lr},
    ]
    if train_head:
        lr = decoder_lr if head_lr is None else head_lr
        groups.append({"name": "head", "params": head, "lr": lr})
    return groups


def prepare_model(
    model: nn.Module,
    device: str | torch.device = "cpu",
    channels_last: bool = True,
    compile: bool = False,
) -> nn.Module:
    """Move a network to a device and memory format (and optionally compile it).

    Parameters
    ----------
    model : torch.nn.Module
        The network; moved in place.
    device : str or torch.device, default "cpu"
        Target device.
    channels_last : bool, default True
        Store 4-d weights in channels-last (NHWC) format, which oneDNN's CPU
        convolutions run faster; inputs may then be given in either format (passing
        ``x.to(memory_format=torch.channels_last)`` saves one conversion).
    compile : bool, default False
        Wrap the network in :func:`torch.compile`. Measured here to cost about a minute
        of compilation for no gain in CPU training speed; the returned wrapper forwards
        attribute access (``size_multiple``, ``encoder_parameters`` ...) to the network
        and shares its parameters and ``state_dict`` keys under ``_orig_mod.``.

    Returns
    -------
    torch.nn.Module
        ``model`` itself, or its compiled wrapper when ``compile`` is true.
    """
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        return torch.compile(model)
    return model
