"""CIFAR-10 data layer: find the data, decode it once, cache it as plain uint8 arrays.

Sources are searched under the data root (``--data DIR`` / ``HARNESS_DATA``) in this order:

1. ``cifar-10-batches-py/``  -- torchvision's layout (the official pickled batches), read by
   torchvision's own loader;
2. ``cifar10-jpeg/{train,test}/<class>/*.jpg`` -- an image tree;
3. ``cifar10-jpeg.tar.gz``   -- the same tree packed; members are decoded straight from the stream;
4. a torchvision download into the data root, only when ``download=True``.

The decoded arrays are cached in ``cache_dir()`` as an uncompressed ``.npz`` (no pickle). The cache
file name carries a fingerprint of the source (resolved path, sizes, mtimes), so changing the source
selects a new cache file. Cache policy: a cache file that cannot be read or holds wrong
shapes/dtypes is *silently rebuilt* (logged at WARNING); there is no CorruptCache exception because
the cache is always reproducible from the source. A file lock beside the cache makes concurrent
first use (e.g. pytest-xdist workers) decode once while the others wait and then read.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pathlib
import tarfile
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
from filelock import FileLock
from PIL import Image

if TYPE_CHECKING:  # torch is imported lazily: cache-building processes never need it
    import torch

log = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

BATCHES_DIR = "cifar-10-batches-py"
JPEG_DIR = "cifar10-jpeg"
JPEG_TAR = "cifar10-jpeg.tar.gz"
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

# Bump when decoding changes in a way that should invalidate existing caches.
_CACHE_FORMAT = 1
_ARRAY_KEYS = ("train_x", "train_y", "test_x", "test_y")


class DataNotFound(FileNotFoundError):
    """No CIFAR-10 source was found under the data root (or no data root was set)."""


def _not_found(root: pathlib.Path | None, detail: str = "") -> DataNotFound:
    # A factory rather than a custom __init__ keeps the exception picklable across processes.
    if root is None:
        where = "No data root was set (neither --data nor HARNESS_DATA)."
    elif not root.is_dir():
        where = f"The data root {root} is not an existing folder."
    else:
        where = f"Searched the data root {root} and found none of them."
    return DataNotFound(
        "CIFAR-10 not found. Provide it in one of three ways: pass `--data DIR` or set "
        f"`HARNESS_DATA=DIR` pointing at a folder that holds `{BATCHES_DIR}/` "
        f"(torchvision's layout), or a `{JPEG_DIR}/` image tree "
        f"(`{JPEG_DIR}/{{train,test}}/<class>/*.jpg`), or `{JPEG_TAR}`; "
        "or pass `--download` (with a data root) to let torchvision fetch it. "
        + where
        + (f" {detail}" if detail else "")
    )


def data_root(explicit: str | os.PathLike | None = None) -> pathlib.Path | None:
    """The data root: the explicit argument wins, else ``HARNESS_DATA``, else None."""
    value = explicit if explicit is not None else os.environ.get("HARNESS_DATA") or None
    return pathlib.Path(value).expanduser() if value is not None else None


def cache_dir() -> pathlib.Path:
    """Where decoded arrays are cached: ``HARNESS_CACHE``, else ``~/.cache/lr-conformance``."""
    value = os.environ.get("HARNESS_CACHE") or "~/.cache/lr-conformance"
    return pathlib.Path(value).expanduser()


@dataclass(frozen=True, eq=False)  # eq=False: elementwise array comparison has no truth value
class CifarArrays:
    train_x: np.ndarray  # uint8 (N, 32, 32, 3), NHWC
    train_y: np.ndarray  # int64 (N,)
    test_x: np.ndarray  # uint8 (M, 32, 32, 3)
    test_y: np.ndarray  # int64 (M,)
    classes: tuple[str, ...] = CLASSES
    source: str = ""

    def __post_init__(self) -> None:
        # Validating here means a damaged cache fails at construction, never later in training.
        for split in SPLITS:
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3):
                raise ValueError(f"{split}_x must be uint8 (N, 32, 32, 3), got {x.dtype} {x.shape}")
            if y.dtype != np.int64 or y.shape != (len(x),):
                raise ValueError(f"{split}_y must be int64 ({len(x)},), got {y.dtype} {y.shape}")
            if len(x) == 0:
                raise ValueError(f"{split} split is empty")
            if y.min() < 0 or y.max() >= len(self.classes):
                raise ValueError(f"{split}_y holds labels outside 0..{len(self.classes) - 1}")


# --------------------------------------------------------------------------- finding the source


@dataclass(frozen=True)
class _Source:
    kind: str  # "torchvision" | "jpeg-tree" | "jpeg-tar"
    path: pathlib.Path

    def describe(self) -> str:
        if self.kind == "torchvision":
            return f"official CIFAR-10 batches in {self.path} (torchvision loader)"
        return f"CIFAR-10 JPEG re-encoding ({self.kind}) at {self.path}"


def _find_source(root: pathlib.Path | None) -> _Source | None:
    if root is None or not root.is_dir():
        return None
    if (root / BATCHES_DIR).is_dir():
        return _Source("torchvision", root / BATCHES_DIR)
    if (root / JPEG_DIR).is_dir():
        return _Source("jpeg-tree", root / JPEG_DIR)
    if (root / JPEG_TAR).is_file():
        return _Source("jpeg-tar", root / JPEG_TAR)
    return None


def _fingerprint(src: _Source) -> str:
    """Changes whenever any file of the source changes (resolved path, size or mtime)."""
    base = src.path.resolve()
    files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
    h = hashlib.sha256(f"{_CACHE_FORMAT}|{src.kind}|{base}".encode())
    for p in files:
        st = p.stat()
        h.update(f"|{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- decoding


def _decode_image(data: bytes, name: str) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img.convert("RGB"))
    if arr.shape != (32, 32, 3):
        raise ValueError(f"{name}: expected a 32x32 image, got {arr.shape[1]}x{arr.shape[0]}")
    return arr


def _image_key(relpath: str) -> tuple[str, int, str] | None:
    """(split, class index, file name) for `.../<split>/<class>/<file>`, None for anything else."""
    parts = relpath.replace("\\", "/").split("/")
    if len(parts) < 3:
        return None
    split, cls, name = parts[-3:]
    if split not in SPLITS or cls not in CLASSES or name.startswith("."):
        return None
    if not name.lower().endswith(IMAGE_SUFFIXES):
        return None
    return split, CLASSES.index(cls), name


def _iter_tree(root: pathlib.Path) -> Iterator[tuple[str, bytes]]:
    for split in SPLITS:
        for cls in CLASSES:
            folder = root / split / cls
            if folder.is_dir():
                for p in folder.iterdir():
                    yield f"{split}/{cls}/{p.name}", p.read_bytes()


def _iter_tar(path: pathlib.Path) -> Iterator[tuple[str, bytes]]:
    # Streaming mode ("r|gz") reads members in archive order without seeking or extracting.
    with tarfile.open(path, "r|gz") as tar:
        for member in tar:
            if member.isfile() and _image_key(member.name) is not None:
                f = tar.extractfile(member)
                assert f is not None  # regular files always have a payload
                yield member.name, f.read()


def _assemble(items: Iterable[tuple[str, bytes]], where: pathlib.Path) -> dict[str, np.ndarray]:
    """Decode images and order them by (split, class index, file name), independent of disk order."""
    found: dict[str, list[tuple[int, str, np.ndarray]]] = {s: [] for s in SPLITS}
    for relpath, data in items:
        key = _image_key(relpath)
        if key is not None:
            split, label, name = key
            found[split].append((label, name, _decode_image(data, relpath)))
    out: dict[str, np.ndarray] = {}
    for split, entries in found.items():
        missing = sorted(set(CLASSES) - {CLASSES[label] for label, _, _ in entries})
        if missing:
            raise ValueError(f"{where}: {split} split has no images for classes {missing}")
        entries.sort(key=lambda e: (e[0], e[1]))
        out[f"{split}_x"] = np.stack([e[2] for e in entries])
        out[f"{split}_y"] = np.array([e[0] for e in entries], dtype=np.int64)
    return out


def _read_torchvision(root: pathlib.Path, *, download: bool = False) -> dict[str, np.ndarray]:
    from torchvision.datasets import CIFAR10

    out: dict[str, np.ndarray] = {}
    for split in SPLITS:
        ds = CIFAR10(str(root), train=split == "train", download=download)
        if tuple(ds.classes) != CLASSES:
            raise ValueError(f"{root / BATCHES_DIR}: unexpected class names {ds.classes}")
        out[f"{split}_x"] = np.ascontiguousarray(ds.data, dtype=np.uint8)
        out[f"{split}_y"] = np.asarray(ds.targets, dtype=np.int64)
    return out


def _decode_source(src: _Source) -> dict[str, np.ndarray]:
    """The slow path; everything else exists so that this runs once per source version."""
    if src.kind == "torchvision":
        return _read_torchvision(src.path.parent)
    if src.kind == "jpeg-tree":
        return _assemble(_iter_tree(src.path), src.path)
    return _assemble(_iter_tar(src.path), src.path)


# --------------------------------------------------------------------------- cache


def _cache_path(src: _Source) -> pathlib.Path:
    # Prefix identifies the source location, suffix its content version; see _prune_stale.
    where = hashlib.sha256(f"{src.kind}|{src.path.resolve()}".encode()).hexdigest()[:8]
    return cache_dir() / f"cifar10-{src.kind}-{where}-{_fingerprint(src)}.npz"


def _read_cache(path: pathlib.Path, source: str) -> CifarArrays | None:
    if not path.is_file():
        return None
    try:
        # Own the file handle: np.load(path) leaks it when the file is not a valid archive.
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in _ARRAY_KEYS}
            classes = tuple(str(c) for c in npz["classes"])
        return CifarArrays(**arrays, classes=classes, source=source)
    except Exception as exc:  # any unreadable/invalid cache is just rebuilt from the source
        log.warning("CIFAR-10 cache %s is unusable (%s: %s); rebuilding", path, type(exc).__name__, exc)
        return None


def _write_cache(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    # Temp file in the same directory so os.replace is an atomic rename: readers never see a
    # half-written cache, even without taking the lock.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays, classes=np.array(CLASSES))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a shared cache should stay readable
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _prune_stale(path: pathlib.Path) -> None:
    """Delete caches of older versions of the same source (each is ~180 MB)."""
    prefix = path.name.rsplit("-", 1)[0] + "-"
    for old in path.parent.glob(prefix + "*.npz"):
        if old != path:
            old.unlink(missing_ok=True)


def load_cifar10(root: str | os.PathLike | None = None, *, download: bool = False) -> CifarArrays:
    """Load CIFAR-10 as uint8 NHWC arrays, decoding the source once and caching the result.

    ``root`` defaults to ``HARNESS_DATA``. Sizes are whatever the source holds (the full
    dataset is 50,000 train / 10,000 test). Raises DataNotFound when no source exists.
    """
    base = data_root(root)
    src = _find_source(base)
    if src is None and download:
        if base is None:
            raise _not_found(None, "--download needs a data root to download into.")
        base.mkdir(parents=True, exist_ok=True)
        _read_torchvision(base, download=True)  # fetches and extracts cifar-10-batches-py/
        src = _find_source(base)
    if src is None:
        raise _not_found(base)

    path = _cache_path(src)
    describe = f"{src.describe()}; cache {path}"
    cached = _read_cache(path, describe)  # fast path: no lock once the cache exists
    if cached is not None:
        return cached

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        # Another process may have built it while we waited for the lock.
        cached = _read_cache(path, describe)
        if cached is not None:
            return cached
        log.info("decoding CIFAR-10 from %s (once; cached at %s)", src.path, path)
        arrays = _decode_source(src)
        result = CifarArrays(**arrays, classes=CLASSES, source=describe)  # validate before caching
        _write_cache(path, arrays)
        _prune_stale(path)
    return result


# --------------------------------------------------------------------------- helpers


def balanced_subset(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices with exactly ``per_class`` examples of each of the 10 classes.

    Deterministic in (labels, per_class, seed); each class draws from its own stream, so for a
    fixed seed a smaller subset is contained in a larger one.
    """
    labels = np.asarray(labels)
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise ValueError(f"labels must lie in 0..{len(CLASSES) - 1}")
    picks = []
    for label in range(len(CLASSES)):
        idx = np.flatnonzero(labels == label)
        if len(idx) < per_class:
            raise ValueError(
                f"class {label} ({CLASSES[label]}) has only {len(idx)} examples, "
                f"fewer than per_class={per_class}"
            )
        rng = np.random.default_rng([seed, label])
        picks.append(rng.permutation(idx)[:per_class])
    return np.sort(np.concatenate(picks)).astype(np.int64)


def to_tensors(
    x_uint8: np.ndarray, y: np.ndarray, *, device: torch.device | str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """NHWC uint8 images -> NCHW tensor normalized with the CIFAR mean/std; labels -> int64."""
    import torch

    if x_uint8.dtype != np.uint8 or x_uint8.ndim != 4 or x_uint8.shape[-1] != 3:
        raise ValueError(f"expected uint8 (N, H, W, 3), got {x_uint8.dtype} {x_uint8.shape}")
    # Move uint8 (4x smaller than float) and normalize on the device; compute in at least
    # float32 so half-precision outputs are rounded once, not at every step.
    work = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.from_numpy(np.ascontiguousarray(x_uint8)).to(device).permute(0, 3, 1, 2).to(work)
    mean = torch.tensor(MEAN, dtype=work, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=work, device=x.device).view(1, 3, 1, 1)
    x = ((x / 255.0 - mean) / std).to(dtype).contiguous()
    return x, torch.as_tensor(np.asarray(y), dtype=torch.int64, device=x.device)
