"""Acquisition, verification, extraction, preparation and split of BBBC038v1."""

from __future__ import annotations

import http.server
import threading
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from conftest import make_sample, png_bytes

from s2l_core import data
from s2l_core.data import (
    MIRROR_SHA256,
    DataError,
    PreparedDataset,
    assign_splits,
    classify_modality,
    extract_archive,
    fetch_archive,
    prepare_dataset,
    read_sample,
    verify_archive,
)

# ----------------------------------------------------------------------------- helpers


class _Server:
    """A threaded HTTP server on 127.0.0.1 serving one folder."""

    def __init__(self, folder: Path, handler=None):
        if handler is None:
            handler = partial(_QuietFileHandler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


class _QuietFileHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _TruncatingHandler(http.server.BaseHTTPRequestHandler):
    """Announces the whole file but sends only its first half."""

    payload = b""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        self.wfile.write(self.payload[: len(self.payload) // 2])

    def log_message(self, *args):
        pass


def _leftovers(folder: Path) -> list[str]:
    """What a folder holds but the lock files (``.<name>.lock``), which stay by design."""
    if not folder.exists():
        return []
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


# ----------------------------------------------------------------------------- modality


def test_classify_modality_rule():
    dark = np.full((8, 8, 3), 20, np.uint8)
    bright = np.full((8, 8, 3), 220, np.uint8)
    tinted = dark.copy()
    tinted[3, 4, 2] = 21  # one pixel whose channels differ
    assert classify_modality(dark) == "fluorescence"
    assert classify_modality(bright) == "brightfield"
    assert classify_modality(tinted) == "histopathology"
    assert classify_modality(np.full((4, 4), 127, np.uint8)) == "fluorescence"
    assert classify_modality(np.full((4, 4), 128, np.uint8)) == "brightfield"
    with pytest.raises(ValueError, match="shape"):
        classify_modality(np.zeros((2, 2, 2, 2)))


# ----------------------------------------------------------------------------- split


def test_assign_splits_counts_and_determinism():
    ids = (
        [f"f{i}" for i in range(546)] + [f"h{i}" for i in range(108)] + [f"b{i}" for i in range(16)]
    )
    mods = ["fluorescence"] * 546 + ["histopathology"] * 108 + ["brightfield"] * 16
    split = assign_splits(ids, mods, seed=3)
    counts = {}
    for m, s in zip(mods, split, strict=True):
        counts[m, s] = counts.get((m, s), 0) + 1
    assert counts == {
        ("fluorescence", "train"): 328,
        ("fluorescence", "val"): 109,
        ("fluorescence", "test"): 109,
        ("histopathology", "train"): 65,
        ("histopathology", "val"): 22,
        ("histopathology", "test"): 21,
        ("brightfield", "train"): 10,
        ("brightfield", "val"): 3,
        ("brightfield", "test"): 3,
    }
    # The same seed gives the same split whatever the input order.
    order = np.random.default_rng(0).permutation(len(ids))
    shuffled = assign_splits([ids[i] for i in order], [mods[i] for i in order], seed=3)
    assert dict(zip([ids[i] for i in order], shuffled, strict=True)) == dict(
        zip(ids, split, strict=True)
    )
    other = assign_splits(ids, mods, seed=4)
    assert other != split
    with pytest.raises(ValueError, match="sum"):
        assign_splits(ids, mods, fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="unique"):
        assign_splits(["a", "a"], ["fluorescence"] * 2)


# ----------------------------------------------------------------------------- verify


def test_verify_small_archive(make_archive):
    info = verify_archive(make_archive())
    assert (info.n_images, info.n_masks) == (3, 9)
    with pytest.raises(DataError, match="holds 3 image folders, expected 670"):
        verify_archive(make_archive(), expected_images=670)
    with pytest.raises(DataError, match="sha256"):
        verify_archive(make_archive(), expected_sha256="0" * 64)


def test_verify_rejects_truncated_zip(make_archive, tmp_path):
    full = make_archive().read_bytes()
    cut = tmp_path / "cut.zip"
    cut.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match="not a readable zip"):
        verify_archive(cut)


def test_verify_rejects_corrupted_member(make_archive, tmp_path):
    raw = bytearray(make_archive().read_bytes())
    # Flip bytes inside the first member's data (after its 30-byte header and name).
    raw[200:210] = bytes(10)
    bad = tmp_path / "bad.zip"
    bad.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"corrupt|not a readable"):
        verify_archive(bad)


@pytest.mark.parametrize("member", ["../evil.png", "/etc/evil.png", "img00/../../evil.png"])
def test_verify_and_extract_refuse_escaping_entries(make_archive, tmp_path, member):
    archive = make_archive(entries={member: b"x"})
    with pytest.raises(DataError, match="outside"):
        verify_archive(archive)
    dest = tmp_path / "out"
    with pytest.raises(DataError, match="outside"):
        extract_archive(archive, dest, progress=False)
    assert not dest.exists()
    assert not (tmp_path.parent / "evil.png").exists()
    assert [p for p in _leftovers(tmp_path) if p.startswith(".out")] == []


def test_verify_rejects_wrong_layout(tmp_path):
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(DataError, match="no image folder"):
        verify_archive(path)


# ----------------------------------------------------------------------------- fetch


def test_fetch_mirror_by_path_and_file_url(mirror, tmp_path):
    by_path = fetch_archive(mirror, tmp_path / "a", progress=False)
    assert by_path == tmp_path / "a" / "stage1_train.zip"
    assert data.read_json(tmp_path / "a" / "stage1_train.zip.json")["sha256"] == MIRROR_SHA256
    by_url = fetch_archive(mirror.resolve().as_uri(), tmp_path / "b", progress=False)
    record = data.read_json(tmp_path / "b" / "stage1_train.zip.json")
    assert (record["sha256"], record["n_images"], record["n_masks"]) == (MIRROR_SHA256, 670, 29461)
    assert by_url.stat().st_size == mirror.stat().st_size
    assert _leftovers(tmp_path / "b") == ["stage1_train.zip", "stage1_train.zip.json"]


def test_fetch_mirror_over_http_and_not_again(mirror, tmp_path):
    cache = tmp_path / "cache"
    with _Server(mirror.parent) as server:
        url = f"{server.url}/{mirror.name}"
        path = fetch_archive(url, cache, progress=False, expected_sha256=MIRROR_SHA256)
    assert data.read_json(cache / "stage1_train.zip.json")["source"] == url
    mtime = path.stat().st_mtime_ns
    # The server is gone: a second call must be served from the cache.
    again = fetch_archive(url, cache, progress=False)
    assert again == path and again.stat().st_mtime_ns == mtime


def test_fetch_from_environment_variable(make_archive, tmp_path, monkeypatch):
    archive = make_archive()
    monkeypatch.setenv(data.SOURCE_ENV, str(archive))
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "envcache"))
    assert data.default_cache_dir() == tmp_path / "envcache"
    path = fetch_archive(progress=False)
    assert path == tmp_path / "envcache" / "stage1_train.zip"
    assert path.read_bytes() == archive.read_bytes()


def test_fetch_truncated_http_download_leaves_nothing(make_archive, tmp_path):
    _TruncatingHandler.payload = make_archive().read_bytes()
    cache = tmp_path / "cache"
    with _Server(tmp_path, _TruncatingHandler) as server:
        with pytest.raises(DataError, match=r"truncated|broke off"):
            fetch_archive(f"{server.url}/stage1_train.zip", cache, progress=False, timeout=10)
    assert _leftovers(cache) == []


def test_fetch_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="neither a URL"):
        fetch_archive(tmp_path / "missing.zip", tmp_path / "c", progress=False)
    with _Server(tmp_path) as server:
        with pytest.raises(DataError, match="cannot open"):
            fetch_archive(f"{server.url}/nothing.zip", tmp_path / "c", progress=False)
    not_zip = tmp_path / "not.zip"
    not_zip.write_bytes(b"this is no zip archive")
    with pytest.raises(DataError, match="not a readable zip"):
        fetch_archive(not_zip, tmp_path / "c", progress=False)
    assert _leftovers(tmp_path / "c") == []


# ----------------------------------------------------------------------------- extract


def test_extract_is_atomic_when_interrupted(make_archive, tmp_path, monkeypatch):
    archive = make_archive()
    dest = tmp_path / "raw"
    calls = {"n": 0}
    original = zipfile.ZipFile.extract

    def failing(self, member, path=None, pwd=None):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, member, path, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "extract", failing)
    with pytest.raises(KeyboardInterrupt):
        extract_archive(archive, dest, progress=False)
    assert _leftovers(tmp_path) == ["tiny.zip"]
    monkeypatch.setattr(zipfile.ZipFile, "extract", original)
    extract_archive(archive, dest, progress=False)
    assert sorted(p.name for p in dest.iterdir()) == [".extracted", "img00", "img01", "img02"]


# ----------------------------------------------------------------------------- prepare


def test_read_sample_builds_uint16_labels(make_archive, tmp_path):
    raw = extract_archive(make_archive(), tmp_path / "raw", progress=False)
    sample = read_sample(raw / "img00")
    assert sample.image.shape == (48, 64, 3) and sample.image.dtype == np.uint8
    assert sample.labels.dtype == np.uint16
    assert sorted(np.unique(sample.labels)) == [0, 1, 2, 3]
    _, masks = make_sample()
    for k, mask in enumerate(masks, start=1):
        assert np.array_equal(sample.labels == k, mask > 0)


def test_read_sample_many_nuclei_stay_distinct(tmp_path):
    folder = tmp_path / "many"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    (folder / "images" / "many.png").write_bytes(png_bytes(np.zeros((20, 20), np.uint8)))
    for k in range(300):  # more than 8 bits can number
        mask = np.zeros((20, 20), np.uint8)
        mask.flat[k] = 255
        (folder / "masks" / f"{k:03d}.png").write_bytes(png_bytes(mask))
    labels = read_sample(folder).labels
    assert labels.max() == 300 and len(np.unique(labels)) == 301


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_masks", "has no masks"),
        ("bad_shape", r"mask .* has shape \(10, 10\), but its image has shape \(48, 64\)"),
        ("overlap", "overlaps"),
    ],
)
def test_prepare_bad_folders_fail_cleanly(make_archive, tmp_path, case, message):
    if case == "no_masks":
        archive = make_archive(skip_masks_of="img01")
    elif case == "bad_shape":
        archive = make_archive(
            entries={"img01/masks/zz.png": png_bytes(np.zeros((10, 10), np.uint8))}
        )
    else:
        _, masks = make_sample()
        archive = make_archive(entries={"img01/masks/zz.png": png_bytes(masks[0])})
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=message):
        prepare_dataset(archive, cache, progress=False, workers=1)
    assert not (cache / "bbbc038").exists()
    leftovers = [p.name for p in cache.iterdir() if p.name.startswith(".bbbc038")]
    assert leftovers == [".bbbc038.lock"]  # the lock file stays; no temporary does


def test_prepare_tiny_archive(make_archive, tmp_path):
    dataset = prepare_dataset(make_archive(), tmp_path / "cache", progress=False, workers=2)
    assert dataset.manifest["modality"].to_dict() == {
        "img00": "fluorescence",
        "img01": "histopathology",
        "img02": "brightfield",
    }
    assert dataset.labels("img00").dtype == np.uint16
    assert dataset.image("img01").shape == (48, 64, 3)
    with pytest.raises(KeyError, match="nope"):
        dataset.image("nope")
    with pytest.raises(DataError, match="not a prepared dataset"):
        PreparedDataset(tmp_path)


# ----------------------------------------------------------------------------- real data


@pytest.mark.slow
def test_mirror_modalities_sizes_and_labels(prepared):
    counts = prepared.manifest["modality"].value_counts().to_dict()
    assert counts == {"fluorescence": 546, "histopathology": 108, "brightfield": 16}
    assert int(prepared.manifest["n_nuclei"].sum()) == 29461
    histo = prepared.manifest[prepared.manifest["modality"] == "histopathology"]
    assert set(zip(histo["height"], histo["width"], strict=True)) == {(256, 320)}
    crowded = prepared.manifest["n_nuclei"].idxmax()
    labels = prepared.labels(crowded)
    assert labels.dtype == np.uint16
    assert labels.max() == prepared.manifest.loc[crowded, "n_nuclei"] > 255
    assert len(np.unique(labels)) == labels.max() + 1
    image = prepared.image(crowded)
    assert image.dtype == np.uint8 and image.shape == (*labels.shape, 3)


@pytest.mark.slow
def test_mirror_split_is_persisted_and_seeded(prepared):
    table = prepared.manifest
    sizes = table.groupby(["modality", "split"]).size().to_dict()
    assert sizes[("fluorescence", "test")] == 109 and sizes[("brightfield", "train")] == 10
    reopened = PreparedDataset(prepared.root)
    assert reopened.ids("fluorescence", "test") == prepared.ids("fluorescence", "test")
    assert prepared.split_seed == 0
    expected = assign_splits(list(table["image_id"]), list(table["modality"]), seed=0)
    assert list(table["split"]) == expected
    assert set(prepared.ids(split="train")).isdisjoint(prepared.ids(split="test"))
    with pytest.raises(ValueError, match="unknown modality"):
        prepared.ids("fluo")


@pytest.mark.slow
def test_prepare_reuses_and_resplits(prepared):
    cache = prepared.root.parent
    stamp = (prepared.root / "images").stat().st_mtime_ns
    again = prepare_dataset(cache / "unused-source.zip", cache, progress=False)
    assert (again.root / "images").stat().st_mtime_ns == stamp
    other = prepare_dataset(None, cache, progress=False, split_seed=1)
    assert other.split_seed == 1
    assert other.ids("fluorescence", "test") != prepared.ids("fluorescence", "test")
    back = prepare_dataset(None, cache, progress=False, split_seed=0)
    assert back.ids("fluorescence", "test") == prepared.ids("fluorescence", "test")


def test_written_files_get_the_usual_mode(tmp_path):
    import os

    from s2l_core.files import write_json

    write_json(tmp_path / "a.json", {"x": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_write_text_replaces_whole_or_not_at_all(tmp_path):
    from s2l_core.files import write_text

    path = tmp_path / "notes" / "a.md"
    write_text(path, "first\n")
    write_text(path, "second é\n")
    assert path.read_bytes() == "second é\n".encode()
    with pytest.raises(UnicodeEncodeError):  # a lone surrogate cannot be written
        write_text(path, "half\ud800")
    assert path.read_text(encoding="utf-8") == "second é\n"
    assert sorted(q.name for q in path.parent.iterdir()) == ["a.md"]  # no temporary left


def test_read_image_kinds_of_png_and_jpeg(tmp_path):
    from PIL import Image

    from s2l_core.files import read_image

    grey = np.add.outer(np.arange(30), np.arange(40)).astype(np.uint8) * 3
    rgb = np.dstack([grey, 255 - grey, grey // 2])
    Image.fromarray(grey).convert("LA").save(tmp_path / "la.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.png")
    la = read_image(tmp_path / "la.png")
    assert la.shape == (30, 40) and la.dtype == np.uint8 and np.array_equal(la, grey)
    cmyk = read_image(tmp_path / "cmyk.jpg")  # as RGB, not as RGBA with K for alpha
    assert cmyk.shape == (30, 40, 3) and np.abs(cmyk.astype(int) - rgb).max() <= 8
    assert read_image(tmp_path / "p.png").shape == (30, 40, 3)
