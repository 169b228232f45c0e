"""Tests of s2l_core.model: shapes, errors, parameter groups, configs, learning."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from s2l_core.model import (
    SMPUNet,
    UNet,
    build_smp_unet,
    count_parameters,
    from_config,
    parameter_groups,
    prepare_model,
)

# Small networks keep the tests fast; the default is checked once where it matters.
SMALL = {"base_channels": 8, "depth": 2, "max_channels": 32}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_default_configuration() -> None:
    model = UNet()
    assert model.size_multiple == 32
    assert model.widths == (24, 48, 96, 192, 256)
    assert 3_000_000 < count_parameters(model) < 3_600_000
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 96))
    assert out.shape == (1, 2, 64, 96)
    assert out.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "multiple"),
    [
        (SMALL, 8),
        ({**SMALL, "stem_factor": 1}, 4),
        ({**SMALL, "head_upsample": "shuffle"}, 8),
        ({**SMALL, "norm": "group"}, 8),
        ({**SMALL, "norm": "none"}, 8),
        ({**SMALL, "depth": 0}, 2),
        ({**SMALL, "stem_factor": 4}, 16),
    ],
)
def test_output_shapes(kwargs: dict, multiple: int) -> None:
    model = UNet(**kwargs)
    assert model.size_multiple == multiple
    for k_h, k_w in [(1, 1), (2, 3), (5, 2)]:
        h, w = k_h * 16, k_w * 16
        out = model(torch.rand(2, 3, h, w))
        assert out.shape == (2, 2, h, w)


def test_num_classes() -> None:
    out = UNet(**SMALL, num_classes=3)(torch.rand(1, 3, 16, 16))
    assert out.shape == (1, 3, 16, 16)


def test_non_multiple_input_raises_clear_error() -> None:
    model = UNet(**SMALL)
    with pytest.raises(ValueError, match=r"multiples of model.size_multiple = 8.*20×16"):
        model(torch.rand(1, 3, 20, 16))
    with pytest.raises(ValueError, match="input channel"):
        model(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="4-d"):
        model(torch.rand(3, 16, 16))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"norm": "layer"},
        {"head_upsample": "nearest"},
        {"depth": -1},
        {"base_channels": 0},
        {"stem_factor": 1.5},
    ],
)
def test_invalid_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        UNet(**kwargs)


def test_grey_input() -> None:
    model = UNet(**SMALL, in_channels=1)
    out = model(torch.rand(2, 1, 32, 48))
    assert out.shape == (2, 2, 32, 48)


@pytest.mark.parametrize("kwargs", [SMALL, {**SMALL, "stem_factor": 1}, {}])
def test_parameter_groups_cover_every_parameter_once(kwargs: dict) -> None:
    model = UNet(**kwargs)
    groups = [model.encoder_parameters(), model.decoder_parameters(), model.head_parameters()]
    assert all(groups)
    ids = [id(p) for group in groups for p in group]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert {id(p) for p in model.head_parameters()} == {id(p) for p in model.head.parameters()}


def test_parameter_groups_helper() -> None:
    model = UNet(**SMALL)
    groups = parameter_groups(model, encoder_lr=3e-4, decoder_lr=3e-3)
    assert [g["name"] for g in groups] == ["encoder", "decoder", "head"]
    assert [g["lr"] for g in groups] == [3e-4, 3e-3, 3e-3]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    torch.optim.RAdam(groups, weight_decay=5e-5, decoupled_weight_decay=True)

    frozen = parameter_groups(model, train_head=False)
    assert [g["name"] for g in frozen] == ["encoder", "decoder"]
    assert not any(p.requires_grad for p in model.head_parameters())
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - sum(
        p.numel() for p in model.head_parameters()
    )


def test_config_round_trip_gives_identical_outputs() -> None:
    model = UNet(**SMALL, in_channels=1, head_upsample="shuffle", norm="group")
    config = json.loads(json.dumps(model.to_config()))  # survives a JSON checkpoint
    assert config == model.config
    assert config["arch"] == "unet"
    rebuilt = from_config(config)
    assert isinstance(rebuilt, UNet)
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())
    model.eval()
    rebuilt.eval()
    x = torch.rand(2, 1, 16, 24)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))


def test_from_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        from_config({"arch": "resnet"})
    with pytest.raises(ValueError, match="invalid configuration"):
        from_config({"arch": "unet", "widht": 3})


def test_deterministic_under_manual_seed() -> None:
    torch.manual_seed(1)
    a = UNet(**SMALL)
    torch.manual_seed(1)
    b = UNet(**SMALL)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("train", [False, True])
def test_channels_last_matches_contiguous(train: bool) -> None:
    model = UNet(**SMALL)
    x = torch.rand(2, 3, 32, 32)
    model.train(train)
    with torch.no_grad():
        expected = model(x)
        prepare_model(model, channels_last=True)
        assert model.head.weight.is_contiguous(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
        got_mixed = model(x)  # contiguous input into a channels-last model
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_mixed, expected, rtol=1e-4, atol=1e-5)


def _square_problem(n: int = 8, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Bright squares on a noisy dark background, and their masks."""
    g = torch.Generator().manual_seed(0)
    images = 0.1 * torch.rand(n, 1, size, size, generator=g)
    masks = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        side = int(torch.randint(12, 28, (1,), generator=g))
        top, left = (int(v) for v in torch.randint(0, size - side, (2,), generator=g))
        images[i, :, top : top + side, left : left + side] += 0.8
        masks[i, top : top + side, left : left + side] = 1
    return images, masks


def test_learns_a_bright_square() -> None:
    images, masks = _square_problem()
    model = prepare_model(UNet(in_channels=1, base_channels=8, depth=2, max_channels=32))
    optimiser = torch.optim.Adam(parameter_groups(model, encoder_lr=1e-2, decoder_lr=1e-2))
    x = images.contiguous(memory_format=torch.channels_last)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x), masks)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert losses[-1] < 0.2
    model.eval()
    with torch.no_grad():
        pred = model(images).argmax(1).bool()
    truth = masks.bool()
    iou = (pred & truth).sum() / (pred | truth).sum()
    assert iou > 0.8


def test_smp_adapter_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "segmentation_models_pytorch", None)
    with pytest.raises(ImportError, match=r"segmentation_models_pytorch.*not installed"):
        build_smp_unet()
    # Rebuilding a stored network says the same, as a ValueError like every bad config.
    with pytest.raises(ValueError, match=r"segmentation_models_pytorch.*pip install"):
        from_config({"arch": "smp_unet", "encoder_name": "resnet50"})


class _FakeSMPUnet(nn.Module):
    """Stands in for ``smp.Unet``: the attributes the adapter relies on."""

    def __init__(self, in_channels: int = 3, classes: int = 2, **_: object) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.decoder = nn.Conv2d(4, 4, 3, padding=1)
        self.segmentation_head = nn.Conv2d(4, classes, 1)
        self.classification_head = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmentation_head(self.decoder(self.encoder(x)))


def test_smp_adapter_interface_with_a_stand_in(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("segmentation_models_pytorch")
    fake.Unet = _FakeSMPUnet  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "segmentation_models_pytorch", fake)
    model = build_smp_unet(encoder_weights="imagenet", in_channels=1)
    assert isinstance(model, SMPUNet)
    assert model.size_multiple == 32 and model.in_channels == 1
    groups = [model.encoder_parameters(), model.decoder_parameters(), model.head_parameters()]
    ids = [id(p) for group in groups for p in group]
    assert sorted(ids) == sorted({id(p) for p in model.parameters()})
    assert model(torch.rand(1, 1, 32, 64)).shape == (1, 2, 32, 64)
    with pytest.raises(ValueError, match="size_multiple"):
        model(torch.rand(1, 1, 40, 64))
    rebuilt = from_config(model.to_config())
    assert rebuilt.config["encoder_weights"] is None  # nothing to download on rebuild
    assert rebuilt.config["in_channels"] == 1
