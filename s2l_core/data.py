"""BBBC038v1 (the 2018 Data Science Bowl nuclei images): acquire, verify, prepare, split.

The pipeline, each step safe to interrupt and cheap to repeat:

1. :func:`fetch_archive` copies ``stage1_train.zip`` from the official address, any URL
   (``http(s)://``, ``file://``) or a local path into a cache folder, streamed to a
   temporary file that is renamed only once it is complete and verified.
2. :func:`extract_archive` unpacks it into a temporary folder that is renamed into place,
   refusing entries that would escape the target folder.
3. :func:`prepare_dataset` turns every image folder into an RGB ``uint8`` image, a
   ``uint16`` instance label image and a modality, and writes a manifest that also holds
   the seeded 60 / 20 / 20 train / validation / test split of each modality.

Every chapter, test and benchmark opens the result with :class:`PreparedDataset`, so all
of them use the same images and the same split.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from s2l_core.files import (
    atomic_dir,
    atomic_path,
    lock_of,
    locked,
    read_image,
    read_json,
    remove_stale,
    sha256_of,
    write_image,
    write_json,
)
from s2l_core.runtime import parallel_map

__all__ = [
    "ARCHIVE_NAME",
    "CACHE_ENV",
    "MIRROR_SHA256",
    "MODALITIES",
    "OFFICIAL_N_IMAGES",
    "OFFICIAL_URL",
    "SOURCE_ENV",
    "SPLITS",
    "ArchiveInfo",
    "DataError",
    "PreparedDataset",
    "assign_splits",
    "classify_modality",
    "default_cache_dir",
    "extract_archive",
    "fetch_archive",
    "prepare_dataset",
    "read_sample",
    "verify_archive",
]

OFFICIAL_URL = "https://data.broadinstitute.org/bbbc/BBBC038/stage1_train.zip"
ARCHIVE_NAME = "stage1_train.zip"
OFFICIAL_N_IMAGES = 670
#: sha256 of the archive as distributed for this project's offline mirror.
MIRROR_SHA256 = "b815e3f4f5590fc40f9434a68a7f9bee9fe44e90f68bd89f912125a28984b0ea"
#: Environment variable naming the archive's source (URL or path) when none is passed.
SOURCE_ENV = "S2L_BBBC038_SOURCE"
#: Environment variable naming the cache folder when none is passed.
CACHE_ENV = "S2L_CACHE_DIR"
MODALITIES = ("fluorescence", "histopathology", "brightfield")
SPLITS = ("train", "val", "test")
#: Version of the prepared layout; a prepared folder of another version is rebuilt.
PREPARED_FORMAT = 1
_CHUNK = 1 << 20


class DataError(ValueError):
    """A dataset archive or folder is missing, corrupt or not in the expected layout."""


# --------------------------------------------------------------------------- acquisition


def default_cache_dir() -> Path:
    """Return the cache folder: ``$S2L_CACHE_DIR``, else ``$XDG_CACHE_HOME/scribble2label``,
    else ``~/.cache/scribble2label``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "scribble2label"


def _resolve_source(source: str | os.PathLike | None) -> str | Path:
    """Return a URL string or an existing local path for the archive."""
    if source is None:
        source = os.environ.get(SOURCE_ENV) or OFFICIAL_URL
    text = str(source)
    if text.startswith(("http://", "https://", "file://")):
        return text
    path = Path(text).expanduser()
    if not path.is_file():
        raise DataError(
            f"archive source {text!r} is neither a URL (http://, https://, file://) nor an "
            "existing file"
        )
    return path


def _is_safe_member(name: str) -> bool:
    """True if a zip member name stays inside the folder it is extracted into."""
    if not name or name.startswith(("/", "\\")) or "\\" in name or ":" in name:
        return False
    return ".." not in PurePosixPath(name).parts


@dataclass(frozen=True)
class ArchiveInfo:
    """What :func:`verify_archive` found in an archive.

    Attributes
    ----------
    path : pathlib.Path
        The archive.
    n_images : int
        Number of image folders (``<id>/images/<id>.png``).
    n_masks : int
        Number of mask files (``<id>/masks/*.png``).
    sha256 : str
        Hex digest of the archive's bytes.
    size : int
        Size in bytes.
    """

    path: Path
    n_images: int
    n_masks: int
    sha256: str
    size: int


def verify_archive(
    path: str | os.PathLike,
    *,
    expected_images: int | None = None,
    expected_sha256: str | None = None,
    sha256: str | None = None,
    name: str | None = None,
) -> ArchiveInfo:
    """Check that a file is a complete BBBC038-style zip archive.

    The archive must open as a zip, every member's CRC must match (this catches
    truncated and corrupted downloads), no member may escape the extraction folder, and
    it must hold at least one ``<id>/images/<id>.png`` image folder.

    Parameters
    ----------
    path : str or os.PathLike
        The archive.
    expected_images : int, optional
        Required number of image folders (670 for the official ``stage1_train.zip``).
    expected_sha256 : str, optional
        Required sha256 hex digest.
    sha256 : str, optional
        The digest if already computed (while downloading), to avoid reading twice.
    name : str, optional
        How errors name the archive (default: ``path``), e.g. the source it was
        downloaded from while ``path`` is still a temporary file.

    Returns
    -------
    ArchiveInfo

    Raises
    ------
    DataError
        Naming what is wrong: unreadable or truncated zip, unsafe entry, wrong layout,
        wrong number of images or wrong checksum.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"archive not found: {path}")
    label = name or str(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            bad = zf.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise DataError(
            f"{label} is not a readable zip archive (truncated or corrupt download?): {err}"
        ) from err
    if bad is not None:
        raise DataError(f"{label} is corrupt: the checksum of member {bad!r} does not match")
    unsafe = [n for n in names if not _is_safe_member(n)]
    if unsafe:
        raise DataError(
            f"{label} holds entries that would be written outside the extraction folder, "
            f"e.g. {unsafe[0]!r}; refusing to use it"
        )
    images: set[str] = set()
    n_masks = 0
    for name in names:
        parts = PurePosixPath(name).parts
        if len(parts) == 3 and parts[1] == "images" and parts[2] == f"{parts[0]}.png":
            images.add(parts[0])
        elif len(parts) == 3 and parts[1] == "masks" and parts[2].endswith(".png"):
            n_masks += 1
    if not images:
        raise DataError(
            f"{label} holds no image folder of the form <id>/images/<id>.png: not a "
            "BBBC038-style archive"
        )
    if expected_images is not None and len(images) != expected_images:
        raise DataError(
            f"{label} holds {len(images)} image folders, expected {expected_images} "
            "(incomplete or wrong archive?)"
        )
    digest = sha256 or sha256_of(path)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise DataError(f"{label} has sha256 {digest}, expected {expected_sha256}")
    return ArchiveInfo(path, len(images), n_masks, digest, path.stat().st_size)


def _stream(reader, writer, total: int | None, desc: str, progress: bool) -> tuple[int, str]:
    """Copy ``reader`` to ``writer`` in chunks; return (bytes, sha256 hex)."""
    digest = hashlib.sha256()
    n = 0
    with tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, disable=not progress
    ) as bar:
        for block in iter(lambda: reader.read(_CHUNK), b""):
            writer.write(block)
            digest.update(block)
            n += len(block)
            bar.update(len(block))
    return n, digest.hexdigest()


def fetch_archive(
    source: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    expected_sha256: str | None = None,
    progress: bool = True,
    force: bool = False,
    timeout: float = 60.0,
) -> Path:
    """Fetch ``stage1_train.zip`` into the cache folder, unless it is already there.

    Parameters
    ----------
    source : str or os.PathLike, optional
        A URL (``https://``, ``http://``, ``file://``) or a local path. Default:
        ``$S2L_BBBC038_SOURCE`` if set, else the official address :data:`OFFICIAL_URL`.
    cache_dir : str or os.PathLike, optional
        Folder for the archive; default :func:`default_cache_dir`.
    expected_sha256 : str, optional
        Required digest of the archive.
    progress : bool, optional
        Show a progress bar.
    force : bool, optional
        Fetch again even if a verified copy is in the cache.
    timeout : float, optional
        Seconds to wait for a network connection.

    Returns
    -------
    pathlib.Path
        The verified archive, ``<cache_dir>/stage1_train.zip``.

    Raises
    ------
    DataError
        If the source cannot be read or the archive fails :func:`verify_archive`. No
        partial file is left in the cache.

    Notes
    -----
    Processes that fetch into one cache take turns (``.stage1_train.zip.lock``). The
    archive is streamed to a temporary file next to its destination and renamed only
    after the byte count, the zip checksums and the layout are verified. A record of
    the verified archive (``stage1_train.zip.json``, with its sha256) lets later calls
    skip the download; a cached archive whose digest no longer matches the record is an
    error that says to fetch again with ``force``.
    The official file must hold 670 image folders; any other source must hold at least
    one.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dest = cache / ARCHIVE_NAME
    with locked(lock_of(dest), f"the archive {dest}"):
        return _fetch_locked(source, cache, dest, expected_sha256, progress, force, timeout)


def _fetch_locked(
    source, cache: Path, dest: Path, expected_sha256, progress, force, timeout
) -> Path:
    record = cache / f"{ARCHIVE_NAME}.json"
    if not force and dest.is_file() and record.is_file():
        info = read_json(record)
        if expected_sha256 is None or info.get("sha256") == expected_sha256.lower():
            if info.get("size") != dest.stat().st_size or sha256_of(dest) != info.get("sha256"):
                raise DataError(
                    f"the cached archive {dest} has changed since it was fetched and "
                    f"verified (its sha256 is not the one recorded in {record.name}); run "
                    "again with --force (force=True) to fetch it again"
                )
            return dest
    resolved = _resolve_source(source)
    expected_images = OFFICIAL_N_IMAGES if resolved == OFFICIAL_URL else None
    cache.mkdir(parents=True, exist_ok=True)
    remove_stale(dest, held=True)
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as out:
            if isinstance(resolved, Path):
                with open(resolved, "rb") as src:
                    size = resolved.stat().st_size
                    n, digest = _stream(src, out, size, ARCHIVE_NAME, progress)
            else:
                try:
                    response = urllib.request.urlopen(resolved, timeout=timeout)
                except (urllib.error.URLError, OSError, ValueError) as err:
                    raise DataError(f"cannot open {resolved}: {err}") from err
                with response:
                    length = response.headers.get("Content-Length")
                    size = int(length) if length else None
                    try:
                        n, digest = _stream(response, out, size, ARCHIVE_NAME, progress)
                    except (OSError, http.client.HTTPException) as err:
                        raise DataError(f"download from {resolved} broke off: {err}") from err
            if size is not None and n != size:
                raise DataError(
                    f"download from {resolved} ended after {n} of {size} bytes (truncated)"
                )
        if digest == MIRROR_SHA256:
            expected_images = OFFICIAL_N_IMAGES
        info = verify_archive(
            tmp,
            expected_images=expected_images,
            expected_sha256=expected_sha256,
            sha256=digest,
            name=f"the archive from {resolved}",
        )
    write_json(
        record,
        {
            "source": str(resolved),
            "sha256": info.sha256,
            "size": info.size,
            "n_images": info.n_images,
            "n_masks": info.n_masks,
        },
    )
    return dest


def extract_archive(
    archive: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Extract a verified archive into ``dest``, atomically.

    Members are extracted into a temporary folder beside ``dest`` that is renamed to
    ``dest`` only when every member is written, so an interrupted run never leaves a
    half-extracted folder that looks valid. A folder extracted earlier (it holds the
    marker file ``.extracted``) is reused unless ``force``.

    Parameters
    ----------
    archive : str or os.PathLike
        The zip archive.
    dest : str or os.PathLike
        The folder to create.
    progress : bool, optional
        Show a progress bar.
    force : bool, optional
        Extract again even if ``dest`` is complete.

    Returns
    -------
    pathlib.Path
        ``dest``.

    Raises
    ------
    DataError
        If the archive is unreadable or holds an entry that would escape ``dest``
        (absolute path or ``..``); nothing is extracted then.
    """
    dest = Path(dest)
    with locked(lock_of(dest), f"the folder {dest}"):
        return _extract_locked(archive, dest, progress, force)


def _extract_locked(archive, dest: Path, progress: bool, force: bool) -> Path:
    marker = dest / ".extracted"
    if not force and marker.is_file():
        return dest
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{archive} is not a readable zip archive: {err}") from err
    with zf:
        members = zf.infolist()
        unsafe = [m.filename for m in members if not _is_safe_member(m.filename)]
        if unsafe:
            raise DataError(
                f"{archive} holds entries that would be written outside {dest}, e.g. "
                f"{unsafe[0]!r}; nothing was extracted"
            )
        remove_stale(dest, held=True)
        with atomic_dir(dest) as tmp:
            for member in tqdm(members, desc="extract", unit="file", disable=not progress):
                zf.extract(member, tmp)
            (tmp / ".extracted").write_text(f"{Path(archive).name}\n", encoding="utf-8")
    return dest


# --------------------------------------------------------------------------- preparation


@dataclass(frozen=True)
class Sample:
    """One prepared image.

    Attributes
    ----------
    image_id : str
        Folder name in the archive.
    image : numpy.ndarray
        ``(H, W, 3)`` ``uint8`` RGB image (alpha dropped).
    labels : numpy.ndarray
        ``(H, W)`` ``uint16`` instance labels: 0 background, ``k`` the k-th mask in file
        name order.
    """

    image_id: str
    image: np.ndarray
    labels: np.ndarray


def _to_rgb(image: np.ndarray, source: Path) -> np.ndarray:
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    elif image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"{source}: unsupported image shape {image.shape}")
    if image.dtype != np.uint8:
        if image.dtype == np.uint16:
            image = (image // 257).astype(np.uint8)
        else:
            raise DataError(f"{source}: unsupported image dtype {image.dtype}")
    return np.ascontiguousarray(image)


def read_sample(folder: str | os.PathLike) -> Sample:
    """Read one BBBC038 image folder (``images/<id>.png`` and ``masks/*.png``).

    Parameters
    ----------
    folder : str or os.PathLike
        The image folder, named by the image id.

    Returns
    -------
    Sample

    Raises
    ------
    DataError
        If the image is missing, there are no masks, a mask's shape differs from the
        image's, masks overlap, or there are more than 65,535 masks.
    """
    folder = Path(folder)
    image_id = folder.name
    image_path = folder / "images" / f"{image_id}.png"
    if not image_path.is_file():
        raise DataError(f"image folder {folder} has no image images/{image_id}.png")
    image = _to_rgb(read_image(image_path), image_path)
    mask_paths = sorted((folder / "masks").glob("*.png"))
    if not mask_paths:
        raise DataError(f"image folder {folder} has no masks (masks/*.png)")
    if len(mask_paths) > np.iinfo(np.uint16).max:
        raise DataError(f"image folder {folder} has {len(mask_paths)} masks; at most 65535")
    labels = np.zeros(image.shape[:2], dtype=np.uint16)
    for k, mask_path in enumerate(mask_paths, start=1):
        mask = read_image(mask_path)
        if mask.ndim == 3:
            mask = mask[..., 0]
        if mask.shape != labels.shape:
            raise DataError(
                f"mask {mask_path} has shape {mask.shape}, but its image has shape {labels.shape}"
            )
        fg = mask > 0
        if np.any(labels[fg]):
            raise DataError(f"mask {mask_path} overlaps an earlier mask of the same image")
        labels[fg] = k
    return Sample(image_id, image, labels)


def classify_modality(image: np.ndarray) -> str:
    """Name the imaging modality of a BBBC038 image from its content.

    The rule is exact on all 670 images of ``stage1_train``: an image whose R, G and B
    channels differ anywhere is stained tissue (``"histopathology"``); a grey image with
    mean intensity below 128 is ``"fluorescence"``; a grey image with mean at or above
    128 is ``"brightfield"``.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W, 3)`` ``uint8`` RGB image, or ``(H, W)`` grey.

    Returns
    -------
    str
        One of :data:`MODALITIES`.
    """
    image = np.asarray(image)
    if image.ndim == 3:
        if image.shape[2] < 3:
            raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
        rgb = image[..., :3]
        if np.any(rgb[..., 0] != rgb[..., 1]) or np.any(rgb[..., 1] != rgb[..., 2]):
            return "histopathology"
        grey = rgb[..., 0]
    elif image.ndim == 2:
        grey = image
    else:
        raise ValueError(f"expected an (H, W) or (H, W, 3) image, got shape {image.shape}")
    return "fluorescence" if float(grey.mean()) < 128 else "brightfield"


def assign_splits(
    ids: Sequence[str],
    modalities: Sequence[str],
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
) -> list[str]:
    """Split images into train / validation / test within each modality, seeded.

    Within a modality the images are ordered by ``sha256(f"{seed}:{image_id}")`` and the
    first ``round(fractions[0] * n)`` go to ``"train"``; of the rest,
    ``round(fractions[1] * n)`` go to ``"val"`` and the remainder to ``"test"``. The
    order depends only on the seed and the ids, not on a random number generator's
    implementation or on the order of the input, so the split is the same on every
    machine and library version.

    Parameters
    ----------
    ids : sequence of str
        Image ids.
    modalities : sequence of str
        The modality of each image (same length as ``ids``).
    seed : int, optional
        Split seed.
    fractions : tuple of 3 floats, optional
        Train, validation and test fractions; they must sum to 1.

    Returns
    -------
    list of str
        ``"train"``, ``"val"`` or ``"test"`` for each id, in input order.
    """
    if len(ids) != len(modalities):
        raise ValueError(f"got {len(ids)} ids but {len(modalities)} modalities")
    if len(set(ids)) != len(ids):
        raise ValueError("image ids must be unique")
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1, got {fractions}")
    result: dict[str, str] = {}
    for modality in sorted(set(modalities)):
        group = [i for i, m in zip(ids, modalities, strict=True) if m == modality]
        group.sort(key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
        n = len(group)
        n_train = round(fractions[0] * n)
        n_val = min(round(fractions[1] * n), n - n_train)
        for k, image_id in enumerate(group):
            result[image_id] = "train" if k < n_train else "val" if k < n_train + n_val else "test"
    return [result[i] for i in ids]


def _prepare_one(args: tuple[Path, Path]) -> dict:
    folder, out = args
    sample = read_sample(folder)
    write_image(out / "images" / f"{sample.image_id}.png", sample.image)
    write_image(out / "labels" / f"{sample.image_id}.png", sample.labels)
    height, width = sample.labels.shape
    return {
        "image_id": sample.image_id,
        "modality": classify_modality(sample.image),
        "height": height,
        "width": width,
        "n_nuclei": int(sample.labels.max()),
    }


class PreparedDataset:
    """A prepared dataset folder: images, instance labels and the manifest.

    Layout of ``root``::

        images/<image_id>.png    RGB uint8
        labels/<image_id>.png    uint16 instance labels (0 background)
        manifest.csv             image_id, modality, height, width, n_nuclei, split
        dataset.json             how it was made (format, source archive, split seed)

    Parameters
    ----------
    root : str or os.PathLike
        A folder made by :func:`prepare_dataset`.

    Raises
    ------
    DataError
        If ``root`` is not a complete prepared folder.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        info_path = self.root / "dataset.json"
        if not info_path.is_file():
            raise DataError(
                f"{self.root} is not a prepared dataset (no dataset.json); run "
                "s2l_core.data.prepare_dataset() or `s2l prepare` first"
            )
        self.info: dict = read_json(info_path)
        self.manifest: pd.DataFrame = pd.read_csv(
            self.root / "manifest.csv", dtype={"image_id": str}
        ).set_index("image_id", drop=False)

    def __repr__(self) -> str:
        counts = self.manifest["modality"].value_counts().to_dict()
        return f"PreparedDataset({str(self.root)!r}, {len(self)} images, {counts})"

    def __len__(self) -> int:
        return len(self.manifest)

    @property
    def split_seed(self) -> int:
        """The seed of the train / validation / test split."""
        return int(self.info["split_seed"])

    def ids(self, modality: str | None = None, split: str | None = None) -> list[str]:
        """Image ids, sorted, optionally of one modality and/or one split.

        Parameters
        ----------
        modality : str, optional
            One of :data:`MODALITIES`.
        split : str, optional
            One of :data:`SPLITS`.
        """
        if modality is not None and modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; choose from {MODALITIES}")
        if split is not None and split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
        table = self.manifest
        if modality is not None:
            table = table[table["modality"] == modality]
        if split is not None:
            table = table[table["split"] == split]
        return sorted(table["image_id"])

    def missing_files(self) -> list[Path]:
        """Image and label files the manifest lists but the folder lacks (empty when the
        dataset is complete)."""
        missing = []
        for kind in ("images", "labels"):
            folder = self.root / kind
            present = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
            names = [f"{i}.png" for i in self.manifest.index]
            missing += [folder / name for name in names if name not in present]
        return missing

    def _check_id(self, image_id: str) -> None:
        if image_id not in self.manifest.index:
            raise KeyError(f"image id {image_id!r} is not in {self.root / 'manifest.csv'}")

    def image_path(self, image_id: str) -> Path:
        """Path of the RGB image of ``image_id``."""
        self._check_id(image_id)
        return self.root / "images" / f"{image_id}.png"

    def labels_path(self, image_id: str) -> Path:
        """Path of the instance label image of ``image_id``."""
        self._check_id(image_id)
        return self.root / "labels" / f"{image_id}.png"

    def image(self, image_id: str) -> np.ndarray:
        """The ``(H, W, 3)`` ``uint8`` RGB image of ``image_id``."""
        return read_image(self.image_path(image_id))

    def labels(self, image_id: str) -> np.ndarray:
        """The ``(H, W)`` ``uint16`` instance labels of ``image_id`` (0 background)."""
        return read_image(self.labels_path(image_id)).astype(np.uint16, copy=False)


def _write_manifest(root: Path, table: pd.DataFrame) -> None:
    with atomic_path(root / "manifest.csv") as tmp:
        table.to_csv(tmp, index=False)


def prepare_dataset(
    source: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    *,
    split_seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    force: bool = False,
    expected_sha256: str | None = None,
) -> PreparedDataset:
    """Fetch, extract and prepare BBBC038v1; reuse whatever an earlier run finished.

    Parameters
    ----------
    source : str or os.PathLike, optional
        Where to get ``stage1_train.zip`` (see :func:`fetch_archive`), or an already
        extracted folder of image folders.
    cache_dir : str or os.PathLike, optional
        Cache folder (default :func:`default_cache_dir`). The prepared dataset is
        ``<cache_dir>/bbbc038``.
    split_seed : int, optional
        Seed of the per-modality 60 / 20 / 20 split (:func:`assign_splits`). Changing it
        rewrites only the manifest.
    workers : int, optional
        Worker processes (default: the number of CPUs, at most 8).
    progress : bool, optional
        Show progress bars.
    force : bool, optional
        Redo every step.
    expected_sha256 : str, optional
        Required digest of the archive.

    Returns
    -------
    PreparedDataset

    Raises
    ------
    DataError
        If the archive or any image folder is bad; the error names the file. Nothing
        half-written is left: the prepared folder appears only once complete.

    Notes
    -----
    Processes that prepare the same cache take turns (a lock file,
    ``<cache_dir>/.bbbc038.lock``); the second finds the first one's result and reuses
    it. A prepared folder is reused only if every file its manifest lists is present;
    temporaries of runs that were killed are removed.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = cache / "bbbc038"
    with locked(lock_of(root), f"the dataset cache {cache}"):
        return _prepare_locked(
            source, cache, root, split_seed, workers, progress, force, expected_sha256
        )


def _prepare_locked(
    source, cache: Path, root: Path, split_seed, workers, progress, force, expected_sha256
) -> PreparedDataset:
    if not force and (root / "dataset.json").is_file():
        dataset = PreparedDataset(root)
        missing = dataset.missing_files()
        if dataset.info.get("format") == PREPARED_FORMAT and not missing:
            if dataset.split_seed != split_seed:
                _resplit(dataset, split_seed)
                dataset = PreparedDataset(root)
            return dataset
        if missing:
            print(
                f"{root} lacks {len(missing)} of its {2 * len(dataset)} files (e.g. "
                f"{missing[0].name}); preparing it again",
                file=sys.stderr,
            )
    if source is not None and Path(str(source)).is_dir():
        raw = Path(source)
        origin = {"source": str(raw)}
    else:
        archive = fetch_archive(
            source, cache, progress=progress, force=force, expected_sha256=expected_sha256
        )
        raw = extract_archive(archive, cache / "stage1_train", progress=progress, force=force)
        origin = read_json(cache / f"{ARCHIVE_NAME}.json")
    folders = sorted(p for p in raw.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{raw} holds no image folders")
    remove_stale(root, held=True)
    with atomic_dir(root) as tmp:
        rows = parallel_map(_prepare_one, [(f, tmp) for f in folders], workers, "prepare", progress)
        table = pd.DataFrame(rows).sort_values("image_id", ignore_index=True)
        table["split"] = assign_splits(
            list(table["image_id"]), list(table["modality"]), seed=split_seed
        )
        _write_manifest(tmp, table)
        write_json(
            tmp / "dataset.json",
            {
                "format": PREPARED_FORMAT,
                "origin": origin,
                "split_seed": split_seed,
                "split_fractions": [0.6, 0.2, 0.2],
                "n_images": len(table),
                "modality_counts": table["modality"].value_counts().to_dict(),
            },
        )
    return PreparedDataset(root)


def _resplit(dataset: PreparedDataset, split_seed: int) -> None:
    table = dataset.manifest.reset_index(drop=True)
    table["split"] = assign_splits(
        list(table["image_id"]), list(table["modality"]), seed=split_seed
    )
    _write_manifest(dataset.root, table)
    info = dict(dataset.info, split_seed=split_seed)
    write_json(dataset.root / "dataset.json", info)
