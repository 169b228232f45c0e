"""Shared fixtures: the local BBBC038 mirror, a prepared copy of it, tiny archives."""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
#: The offline mirror of stage1_train.zip, beside the repository (override: S2L_MIRROR).
MIRROR = Path(
    os.environ.get("S2L_MIRROR", REPO.parent / "shared" / "data" / "bbbc038" / "stage1_train.zip")
)


@pytest.fixture(scope="session")
def mirror() -> Path:
    """The local copy of the official stage1_train.zip."""
    if not MIRROR.is_file():
        pytest.fail(
            f"the BBBC038 mirror is missing at {MIRROR}; the tests need it (set S2L_MIRROR)"
        )
    return MIRROR


@pytest.fixture(scope="session")
def prepared(mirror, tmp_path_factory):
    """The mirror fetched, extracted and prepared once for the whole test session."""
    from s2l_core.data import MIRROR_SHA256, prepare_dataset

    cache = tmp_path_factory.mktemp("cache")
    return prepare_dataset(mirror, cache, progress=False, expected_sha256=MIRROR_SHA256)


@pytest.fixture(scope="session")
def scribble_set(prepared):
    """Scribbles at the four ratios, seed 0, for the prepared mirror."""
    from s2l_core.scribbles import prepare_scribbles

    return prepare_scribbles(prepared, seed=0, progress=False)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def disk(shape: tuple[int, int], center: tuple[int, int], radius: float) -> np.ndarray:
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    return (rr - center[0]) ** 2 + (cc - center[1]) ** 2 <= radius**2


def make_sample(
    shape: tuple[int, int] = (48, 64), n: int = 3, colour: bool = False, bright: bool = False
) -> tuple[np.ndarray, list[np.ndarray]]:
    """An RGBA image with ``n`` disk nuclei and their 0/255 masks."""
    masks = [
        disk(shape, (12 + 14 * (k % 2), 12 + 18 * k), 5).astype(np.uint8) * 255 for k in range(n)
    ]
    fg = np.any(masks, axis=0)
    grey = np.where(fg, 40 if bright else 200, 230 if bright else 10).astype(np.uint8)
    rgba = np.stack([grey, grey, grey, np.full_like(grey, 255)], axis=-1)
    if colour:
        rgba[..., 0] = np.clip(rgba[..., 0].astype(int) + 30, 0, 255)
    return rgba, masks


@pytest.fixture
def make_archive(tmp_path) -> Callable[..., Path]:
    """Write a small BBBC038-style zip; ``entries`` may add or override raw members."""

    def build(
        name: str = "tiny.zip",
        n_images: int = 3,
        entries: dict[str, bytes] | None = None,
        skip_masks_of: str | None = None,
    ) -> Path:
        path = tmp_path / name
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
            for k in range(n_images):
                image_id = f"img{k:02d}"
                image, masks = make_sample(colour=k == 1, bright=k == 2)
                zf.writestr(f"{image_id}/images/{image_id}.png", png_bytes(image))
                if image_id == skip_masks_of:
                    continue
                for j, mask in enumerate(masks):
                    zf.writestr(f"{image_id}/masks/m{j}.png", png_bytes(mask))
            for member, data in (entries or {}).items():
                zf.writestr(member, data)
        return path

    return build


def load_tool(name: str):
    """The module ``tools/<name>.py`` of this repository (the tools are scripts, not a
    package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_nuclei(seed: int, shape: tuple[int, int] = (96, 96), n: int = 6):
    """A dark image with ``n`` bright disk nuclei: ``(rgb uint8, labels uint16)``."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint16)
    for k in range(1, n + 1):
        for _ in range(50):
            centre = (rng.integers(8, shape[0] - 8), rng.integers(8, shape[1] - 8))
            d = disk(shape, centre, rng.uniform(4, 7))
            if not labels[d].any():
                labels[d] = k
                break
    grey = np.where(labels > 0, 170, 25) + rng.normal(0, 12, shape)
    grey = np.clip(grey, 0, 255).astype(np.uint8)
    return np.stack([grey] * 3, axis=-1), labels


@pytest.fixture
def synthetic_samples():
    """Factory of training samples from synthetic images with synthesized scribbles."""
    from s2l_core.samples import TrainSample
    from s2l_core.scribbles import synthesize_scribbles

    def build(n: int = 4, ratio: float = 0.5, shape=(96, 96), offset: int = 0):
        samples = []
        for k in range(n):
            image, labels = synthetic_nuclei(k + offset, shape)
            scribble = synthesize_scribbles(labels, ratio, seed=k, key=str(k)).scribble
            sample = TrainSample.from_arrays(f"syn{k + offset}", image, scribble, labels)
            samples.append(sample)
        return samples

    return build


class BrightNet(torch.nn.Module):
    """A stand-in network: foreground where the first channel exceeds 0.5.

    It records the ``(H, W)`` of every input it sees in ``seen``, so a test can count its
    passes and check the sizes it was given.
    """

    size_multiple = 4

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(tuple(x.shape[-2:]))
        fg = 20.0 * (x[:, :1] - 0.5)
        return torch.cat([torch.zeros_like(fg), fg], dim=1)


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests train tiny networks: one thread is fastest and immune to a loaded machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
