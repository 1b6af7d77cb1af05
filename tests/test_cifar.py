"""Tests for harness.cifar: every source on tiny synthetic fixtures, the cache, and the real data."""

from __future__ import annotations

import io
import os
import pathlib
import pickle
import subprocess
import sys
import tarfile
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image

from harness import cifar
from harness.cifar import CLASSES

PROJECT = pathlib.Path(__file__).resolve().parents[1]
# Captured before the autouse fixture isolates the environment; only the real-data test uses them.
_REAL_CACHE = os.environ.get("HARNESS_CACHE")
_REAL_ROOTS = [os.environ.get("HARNESS_DATA"), str(PROJECT.parent / "shared" / "data"), "/work/shared/data"]
REAL_ROOT = next(
    (pathlib.Path(r) for r in _REAL_ROOTS if r and (pathlib.Path(r) / cifar.JPEG_TAR).is_file()), None
)
PER_CLASS = 2  # tiny fixtures: 2 images per class and split


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Each test gets its own empty cache and no data root from the environment."""
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HARNESS_DATA", raising=False)
    torch.set_num_threads(1)


@pytest.fixture
def decode_count(monkeypatch):
    """Counts calls of the slow decode path in this process."""
    calls = []
    real = cifar._decode_source

    def counted(src):
        calls.append(src)
        return real(src)

    monkeypatch.setattr(cifar, "_decode_source", counted)
    return calls


def pixel(split: str, label: int, i: int) -> int:
    """A distinct flat grey per image, far enough apart to survive JPEG rounding."""
    return 10 + 100 * (split == "test") + 8 * label + 3 * i


def make_tree(root: pathlib.Path) -> pathlib.Path:
    for split in cifar.SPLITS:
        for label, cls in enumerate(CLASSES):
            folder = root / cifar.JPEG_DIR / split / cls
            folder.mkdir(parents=True)
            for i in range(PER_CLASS):
                img = np.full((32, 32, 3), pixel(split, label, i), np.uint8)
                Image.fromarray(img).save(folder / f"{i:04d}.jpg", quality=95)
    return root


def make_tar(root: pathlib.Path, tree_root: pathlib.Path, extra: dict[str, bytes] | None = None) -> pathlib.Path:
    """Pack the tree in *reverse* order plus junk members, to prove ordering and filtering."""
    root.mkdir(parents=True, exist_ok=True)
    files = sorted((tree_root / cifar.JPEG_DIR).rglob("*.jpg"), reverse=True)
    path = root / cifar.JPEG_TAR
    with tarfile.open(path, "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=str(f.relative_to(tree_root)))
        for name, data in (extra or {}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def expected_labels() -> np.ndarray:
    return np.repeat(np.arange(len(CLASSES)), PER_CLASS)


def check_tiny(arrays: cifar.CifarArrays) -> None:
    for split in cifar.SPLITS:
        x, y = getattr(arrays, f"{split}_x"), getattr(arrays, f"{split}_y")
        assert x.shape == (len(CLASSES) * PER_CLASS, 32, 32, 3) and x.dtype == np.uint8
        assert y.dtype == np.int64
        np.testing.assert_array_equal(y, expected_labels())
        # Order is (class, file name): image k of class c has the grey of (c, k).
        want = [pixel(split, c, i) for c in range(len(CLASSES)) for i in range(PER_CLASS)]
        np.testing.assert_allclose(x.reshape(len(x), -1).mean(1), want, atol=2)
    assert arrays.classes == CLASSES


def write_fake_batches(root: pathlib.Path) -> dict[str, np.ndarray]:
    """torchvision's cifar-10-batches-py layout with tiny batches (5 train + 1 test)."""
    folder = root / cifar.BATCHES_DIR
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    xs: dict[str, list] = {"train": [], "test": []}
    ys: dict[str, list] = {"train": [], "test": []}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        split = "test" if name == "test_batch" else "train"
        x = rng.integers(0, 256, (len(CLASSES), 32, 32, 3), dtype=np.uint8)
        y = rng.permutation(len(CLASSES)).tolist()
        # Official batches store rows as flattened CHW.
        entry = {"data": x.transpose(0, 3, 1, 2).reshape(len(x), -1), "labels": y}
        (folder / name).write_bytes(pickle.dumps(entry))
        xs[split].append(x)
        ys[split].extend(y)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(CLASSES)}))
    return {
        "train_x": np.concatenate(xs["train"]), "train_y": np.array(ys["train"]),
        "test_x": np.concatenate(xs["test"]), "test_y": np.array(ys["test"]),
    }


@pytest.fixture
def skip_md5(monkeypatch):
    # torchvision verifies the official md5 sums, which fake batches cannot match.
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    return tv_cifar


# --------------------------------------------------------------------------- locating data


def test_data_root_and_cache_dir(monkeypatch, tmp_path):
    assert cifar.data_root() is None
    monkeypatch.setenv("HARNESS_DATA", "/from/env")
    assert cifar.data_root() == pathlib.Path("/from/env")
    assert cifar.data_root(tmp_path) == tmp_path  # explicit wins
    assert cifar.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("HARNESS_CACHE")
    assert cifar.cache_dir() == pathlib.Path.home() / ".cache" / "lr-conformance"


def test_not_found_message_names_every_way(tmp_path, monkeypatch):
    with pytest.raises(cifar.DataNotFound) as e:
        cifar.load_cifar10(tmp_path)
    msg = str(e.value)
    for needle in ("--data", "HARNESS_DATA", "--download", "cifar-10-batches-py", "cifar10-jpeg/",
                   "cifar10-jpeg.tar.gz", str(tmp_path)):
        assert needle in msg
    assert isinstance(e.value, FileNotFoundError)

    with pytest.raises(cifar.DataNotFound, match="No data root was set"):
        cifar.load_cifar10()
    with pytest.raises(cifar.DataNotFound, match="needs a data root"):
        cifar.load_cifar10(download=True)
    with pytest.raises(cifar.DataNotFound, match="not an existing folder"):
        cifar.load_cifar10(tmp_path / "missing")
    # Picklable, so it survives multiprocessing / xdist boundaries intact.
    assert str(pickle.loads(pickle.dumps(e.value))) == str(e.value)


# --------------------------------------------------------------------------- sources


def test_jpeg_tree(tmp_path):
    arrays = cifar.load_cifar10(make_tree(tmp_path / "data"))
    check_tiny(arrays)
    assert "jpeg-tree" in arrays.source


def test_jpeg_tar_matches_tree_and_ignores_junk(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "tree")
    junk = {"cifar10-jpeg/README.txt": b"hi", "cifar10-jpeg/train/cat/._0000.jpg": b"\0"}
    make_tar(tmp_path / "packed", tree, junk)
    from_tar = cifar.load_cifar10(tmp_path / "packed")
    check_tiny(from_tar)
    assert "jpeg-tar" in from_tar.source
    from_tree = cifar.load_cifar10(tree)
    for k in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(from_tar, k), getattr(from_tree, k))
    # HARNESS_DATA is the default root.
    monkeypatch.setenv("HARNESS_DATA", str(tmp_path / "packed"))
    assert "jpeg-tar" in cifar.load_cifar10().source


def test_missing_class_is_an_error(tmp_path):
    root = make_tree(tmp_path / "data")
    for f in (root / "cifar10-jpeg" / "test" / "frog").iterdir():
        f.unlink()
    with pytest.raises(ValueError, match="frog"):
        cifar.load_cifar10(root)


def test_torchvision_layout(tmp_path, skip_md5):
    want = write_fake_batches(tmp_path / "data")
    arrays = cifar.load_cifar10(tmp_path / "data")
    for k, v in want.items():
        np.testing.assert_array_equal(getattr(arrays, k), v)
    assert "official" in arrays.source


def test_source_priority(tmp_path, skip_md5):
    root = make_tree(tmp_path / "data")
    make_tar(root, root)
    assert "jpeg-tree" in cifar.load_cifar10(root).source  # tree beats tarball
    write_fake_batches(root)
    assert "official" in cifar.load_cifar10(root).source  # torchvision layout beats both


def test_download_uses_torchvision(tmp_path, skip_md5, monkeypatch):
    fetched = []

    def fake_download(self):  # stands in for the network fetch + extract
        if not (pathlib.Path(self.root) / cifar.BATCHES_DIR).exists():
            fetched.append(self.root)
            write_fake_batches(pathlib.Path(self.root))

    monkeypatch.setattr(skip_md5.CIFAR10, "download", fake_download)
    root = tmp_path / "new"
    with pytest.raises(cifar.DataNotFound):
        cifar.load_cifar10(root)  # no download unless asked
    arrays = cifar.load_cifar10(root, download=True)
    assert len(fetched) == 1 and "official" in arrays.source


# --------------------------------------------------------------------------- cache


def test_cache_is_reused(tmp_path, decode_count):
    root = make_tree(tmp_path / "data")
    first = cifar.load_cifar10(root)
    second = cifar.load_cifar10(root)
    assert len(decode_count) == 1
    np.testing.assert_array_equal(first.train_x, second.train_x)
    (npz,) = (tmp_path / "cache").glob("*.npz")
    with np.load(npz, allow_pickle=False) as z:  # plain arrays, no pickled objects
        assert set(z.files) == {"train_x", "train_y", "test_x", "test_y", "classes"}


def test_cache_invalidated_when_source_changes(tmp_path, decode_count):
    tree = make_tree(tmp_path / "tree")
    tar = make_tar(tmp_path / "data", tree)
    cifar.load_cifar10(tmp_path / "data")
    cifar.load_cifar10(tmp_path / "data")
    assert len(decode_count) == 1

    # Same content, new mtime: rebuilt (cheap stat-based key, no content hashing).
    st = tar.stat()
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cifar.load_cifar10(tmp_path / "data")
    assert len(decode_count) == 2

    # New content: the change shows up.
    img = tree / "cifar10-jpeg" / "train" / "airplane" / "0000.jpg"
    Image.fromarray(np.full((32, 32, 3), 250, np.uint8)).save(img, quality=95)
    make_tar(tmp_path / "data", tree)
    arrays = cifar.load_cifar10(tmp_path / "data")
    assert len(decode_count) == 3
    assert abs(arrays.train_x[0].mean() - 250) < 2
    # Stale versions of the same source are pruned.
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "wrong_shape"])
def test_corrupt_cache_is_rebuilt(tmp_path, decode_count, damage):
    root = make_tree(tmp_path / "data")
    cifar.load_cifar10(root)
    (npz,) = (tmp_path / "cache").glob("*.npz")
    if damage == "truncated":
        npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    elif damage == "garbage":
        npz.write_bytes(b"not a zip file" * 100)
    elif damage == "empty":
        npz.write_bytes(b"")
    else:
        bad = {k: np.zeros((3, 8, 8, 3) if k.endswith("x") else 3, np.uint8) for k in cifar._ARRAY_KEYS}
        with open(npz, "wb") as f:
            np.savez(f, **bad, classes=np.array(CLASSES))
    check_tiny(cifar.load_cifar10(root))
    assert len(decode_count) == 2
    check_tiny(cifar.load_cifar10(root))  # and the rebuilt cache is good
    assert len(decode_count) == 2


WORKER = textwrap.dedent(
    """
    import hashlib, os, pathlib, sys, time
    from harness import cifar

    root, log, barrier, n = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]), int(sys.argv[4])
    real = cifar._decode_source

    def counted(src):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(1.0)  # hold the lock a while so the other workers really have to wait
        return real(src)

    cifar._decode_source = counted
    (barrier / str(os.getpid())).touch()
    while len(list(barrier.iterdir())) < n:  # start loading together
        time.sleep(0.01)
    a = cifar.load_cifar10(root)
    h = hashlib.sha256()
    for arr in (a.train_x, a.train_y, a.test_x, a.test_y):
        h.update(arr.tobytes())
    print(h.hexdigest())
    """
)


def test_concurrent_first_use_decodes_once(tmp_path):
    root = make_tar(tmp_path / "data", make_tree(tmp_path / "tree"))
    script, log, barrier = tmp_path / "worker.py", tmp_path / "decodes.log", tmp_path / "barrier"
    script.write_text(WORKER)
    barrier.mkdir()
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "OMP_NUM_THREADS": "1"}
    n = 3
    procs = [
        subprocess.Popen([sys.executable, str(script), str(root.parent), str(log), str(barrier), str(n)],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(n)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    digests = {out.strip() for out, _ in outs}
    assert len(digests) == 1
    assert len(log.read_text().split()) == 1  # exactly one process decoded
    assert not list((tmp_path / "cache").glob("*.tmp"))  # no temp files left behind


# --------------------------------------------------------------------------- helpers


def test_balanced_subset():
    labels = np.random.default_rng(1).integers(0, 10, 1000)
    a = cifar.balanced_subset(labels, 7, seed=3)
    assert a.dtype == np.int64 and len(a) == 70
    assert np.all(np.diff(a) > 0)  # sorted, no duplicates
    assert np.all(np.bincount(labels[a], minlength=10) == 7)
    np.testing.assert_array_equal(a, cifar.balanced_subset(labels, 7, seed=3))
    assert not np.array_equal(a, cifar.balanced_subset(labels, 7, seed=4))
    # For a fixed seed, smaller subsets nest inside larger ones.
    assert set(cifar.balanced_subset(labels, 3, seed=3)) <= set(a)
    assert len(cifar.balanced_subset(labels, 0, seed=3)) == 0


def test_balanced_subset_errors():
    labels = np.repeat(np.arange(10), 5)
    labels[labels == 6] = 5  # no frogs at all
    with pytest.raises(ValueError, match="class 6 \\(frog\\) has only 0"):
        cifar.balanced_subset(labels, 1, seed=0)
    with pytest.raises(ValueError, match="fewer than per_class=6"):
        cifar.balanced_subset(np.repeat(np.arange(10), 5), 6, seed=0)
    with pytest.raises(ValueError):
        cifar.balanced_subset(np.array([0, 10]), 1, seed=0)


def test_to_tensors():
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    y = np.array([0, 3, 9, 1])
    tx, ty = cifar.to_tensors(x, y, device="cpu", dtype=torch.float32)
    assert tx.shape == (4, 3, 32, 32) and tx.dtype == torch.float32 and tx.is_contiguous()
    assert ty.dtype == torch.int64 and ty.tolist() == [0, 3, 9, 1]
    mean, std = np.array(cifar.MEAN), np.array(cifar.STD)
    want = ((x / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(tx.numpy(), want, atol=1e-5)
    t64, _ = cifar.to_tensors(x, y, device="cpu", dtype=torch.float64)
    np.testing.assert_allclose(t64.numpy(), want, atol=1e-12)
    tb, _ = cifar.to_tensors(x, y, device="cpu", dtype=torch.bfloat16)
    assert tb.dtype == torch.bfloat16
    with pytest.raises(ValueError):
        cifar.to_tensors(x.astype(np.float32), y, device="cpu", dtype=torch.float32)


# --------------------------------------------------------------------------- the real data


@pytest.mark.skipif(REAL_ROOT is None, reason="real CIFAR-10 tarball not found (set HARNESS_DATA)")
def test_real_cifar10(monkeypatch):
    # Uses the real cache location, so only the very first run pays for the decode (~5 s).
    if _REAL_CACHE:
        monkeypatch.setenv("HARNESS_CACHE", _REAL_CACHE)
    else:
        monkeypatch.delenv("HARNESS_CACHE")
    cifar.load_cifar10(REAL_ROOT)
    t0 = time.perf_counter()
    a = cifar.load_cifar10(REAL_ROOT)
    assert time.perf_counter() - t0 < 5  # cached load is ~1 s or less
    assert a.train_x.shape == (50000, 32, 32, 3) and a.test_x.shape == (10000, 32, 32, 3)
    assert np.all(np.bincount(a.train_y, minlength=10) == 5000)
    assert np.all(np.bincount(a.test_y, minlength=10) == 1000)
    means = a.train_x.reshape(-1, 3).mean(0)
    np.testing.assert_allclose(means, [125.3, 123.0, 113.9], atol=1.5)
    # Normalized data is roughly zero-mean, unit-variance per channel.
    idx = cifar.balanced_subset(a.train_y, 100, seed=0)
    tx, _ = cifar.to_tensors(a.train_x[idx], a.train_y[idx], device="cpu", dtype=torch.float32)
    np.testing.assert_allclose(tx.mean(dim=(0, 2, 3)).numpy(), 0, atol=0.1)
    np.testing.assert_allclose(tx.std(dim=(0, 2, 3)).numpy(), 1, atol=0.1)


def test_cli_download_flag_reaches_the_data_layer(tmp_path, skip_md5, monkeypatch, capsys):
    """`harness run --download` is the third way the not-found message names: without it a CIFAR
    case is bad input (exit 2, nothing fetched); with it torchvision fetches into the data root
    (the 5-image fake is then too small for the case's subset: a different error, not 'not found')."""
    from harness import cli

    fetched = []

    def fake_download(self):
        if not (pathlib.Path(self.root) / cifar.BATCHES_DIR).exists():
            fetched.append(self.root)
            write_fake_batches(pathlib.Path(self.root))

    monkeypatch.setattr(skip_md5.CIFAR10, "download", fake_download)
    monkeypatch.delenv("HARNESS_DOWNLOAD", raising=False)
    root = tmp_path / "empty"
    root.mkdir()
    args = ["run", "batch-cifar-increase-batch", "--smoke", "--data", str(root)]
    assert cli.main([*args, "--out", str(tmp_path / "r1")]) == 2 and not fetched
    assert "CIFAR-10 not found" in capsys.readouterr().err
    cli.main([*args, "--download", "--out", str(tmp_path / "r2")])
    assert len(fetched) == 1
    assert "CIFAR-10 not found" not in capsys.readouterr().err
