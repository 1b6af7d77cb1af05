"""Data sources, by registry name. A source serves the batch sequence of one seed: every arm of a
case gets the same batch at the same step because the runner draws it once per step.

Randomness comes only from the generators handed in (the data stream for sampling, the
augmentation stream for crops/flips), never from torch's global RNG.
"""
from __future__ import annotations

import os
from typing import Callable

import torch


class TensorSource:
    """Batches sampled without replacement, reshuffled each epoch, from tensors on the device."""

    def __init__(self, train_x: torch.Tensor, train_y: torch.Tensor, *, batch_size: int,
                 gen: torch.Generator, aug_gen: torch.Generator | None = None, augment: bool | str = False,
                 test_x: torch.Tensor | None = None, test_y: torch.Tensor | None = None,
                 eval_sets: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None, transform=None):
        if not 1 <= batch_size <= len(train_x):
            raise ValueError(f"batch_size must be in [1, {len(train_x)}] (the training set size), "
                             f"got {batch_size}")
        self.train_x, self.train_y, self.test_x, self.test_y = train_x, train_y, test_x, test_y
        # Named held-out sets beyond the test split (per-pattern or patch-only examples): the
        # 'eval_acc' measurement reports accuracy on each as metric 'acc_<name>'.
        self.eval_sets = dict(eval_sets or {})
        # A per-access transform of training examples (harness.patch.Patch): draw(n, gen) and
        # apply(x, y, idx, draws); its draws come from the augmentation stream.
        self.transform = transform
        self.batch_size, self.gen, self.aug_gen, self.augment = batch_size, gen, aug_gen, augment
        if augment not in (False, True, "crop_flip", "flip"):
            raise ValueError(f"augment must be False, True (= 'crop_flip') or 'flip', got {augment!r}")
        self.steps_per_epoch = len(train_x) // batch_size
        self._order: torch.Tensor | None = None
        self._pos = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._order is None or self._pos + self.batch_size > len(self._order):
            self._order = torch.randperm(len(self.train_x), generator=self.gen).to(self.train_x.device)
            self._pos = 0
        idx = self._order[self._pos:self._pos + self.batch_size]
        self._pos += self.batch_size
        return self.take(idx, self._draw(len(idx)))

    def epoch_plan(self) -> tuple[torch.Tensor, dict | None]:
        """One epoch's example order (data stream) and every example's random draws (augmentation,
        transform; augmentation stream), made once and shared by all arms, whatever batch size each
        arm cuts the epoch into (see slice_draws)."""
        order = torch.randperm(len(self.train_x), generator=self.gen).to(self.train_x.device)
        return order, self._draw(len(order))

    def take(self, idx: torch.Tensor, draws: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The training examples `idx` with their draws (from epoch_plan, sliced alike)."""
        x, y = self.train_x[idx], self.train_y[idx]
        if draws and "transform" in draws:
            x = self.transform.apply(x, y, idx, draws["transform"])
        if draws and "augment" in draws:
            x = self._augment(x, draws["augment"])
        return x, y

    def _draw(self, n: int) -> dict | None:
        draws = {}
        if self.augment == "flip":
            draws["augment"] = {"flip": torch.rand(n, generator=self.aug_gen) < 0.5}
        elif self.augment:
            draws["augment"] = crop_flip_params(n, self.aug_gen)
        if self.transform is not None:
            draws["transform"] = self.transform.draw(n, self.aug_gen)
        return draws or None

    def _augment(self, x: torch.Tensor, params: dict) -> torch.Tensor:
        if "dy" not in params:
            flip = params["flip"].to(x.device)
            return torch.where(flip[:, None, None, None], x.flip(3), x)
        return apply_crop_flip(x, params)

    def probe(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """A fixed batch from the training set, on its own stream (probing never shifts the data)."""
        idx = torch.randperm(len(self.train_x), generator=gen)[:n].to(self.train_x.device)
        return self.train_x[idx]


def crop_flip_params(n: int, gen: torch.Generator, pad: int = 4) -> dict:
    """Per-example crop offsets and flips, drawn in a fixed order from `gen`."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    return {"dy": dy, "dx": dx, "flip": flip, "pad": pad}


def apply_crop_flip(x: torch.Tensor, params: dict) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, vectorized over the batch (NCHW)."""
    n, _, h, w = x.shape
    pad = params["pad"]
    dy, dx, flip = (params[k].to(x.device) for k in ("dy", "dx", "flip"))
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])  # n × h
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])  # n × w
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def slice_draws(draws: dict | None, lo: int, hi: int) -> dict | None:
    """Examples lo..hi of an epoch plan's draws (nested dicts of per-example tensors)."""
    if draws is None:
        return None
    return {k: (slice_draws(v, lo, hi) if isinstance(v, dict) else v[lo:hi] if isinstance(v, torch.Tensor) else v)
            for k, v in draws.items()}


def gaussian_mixture(*, gen: torch.Generator, aug_gen: torch.Generator, dtype: torch.dtype,
                     device: torch.device, smoke: bool, n: int = 512, shape: tuple[int, ...] = (20,),
                     classes: int = 5, separation: float = 1.0, batch_size: int = 32) -> TensorSource:
    """Class means ~ N(0, separation²·I), unit Gaussian noise. Drawn on the data stream."""
    if smoke:
        n = min(n, 4 * batch_size)
    means = separation * torch.randn((classes, *shape), generator=gen, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=gen)
    x = means[y] + torch.randn((n, *shape), generator=gen, dtype=torch.float64)
    return TensorSource(x.to(device, dtype), y.to(device), batch_size=batch_size, gen=gen)


def two_blobs(*, gen: torch.Generator, aug_gen: torch.Generator, dtype: torch.dtype,
              device: torch.device, smoke: bool, n: int = 64, mean: tuple[float, float] = (1.0, 0.5),
              noise: float = 1.0) -> TensorSource:
    """n 2-D points, y ∈ {0, 1} balanced, x = ±mean + noise; served full-batch (gradient descent)."""
    y = torch.arange(n) % 2
    sign = (2 * y - 1).to(torch.float64)[:, None]
    x = sign * torch.tensor(mean, dtype=torch.float64) + noise * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return TensorSource(x.to(device, dtype), y.to(device), batch_size=n, gen=gen)


def cifar10(*, gen: torch.Generator, aug_gen: torch.Generator, dtype: torch.dtype,
            device: torch.device, smoke: bool, batch_size: int = 128, per_class: int | None = None,
            test_per_class: int | None = None, augment: bool | str = True, subset_seed: int = 0,
            smoke_per_class: int = 8, patch: dict | None = None) -> TensorSource:
    """CIFAR-10 through the data layer (harness.cifar); subsets are class-balanced and fixed by
    `subset_seed`, not by the run's seed, so every seed sees the same images. `patch`: the options
    of a harness.patch.PatchRecipe (patched CIFAR-10 of Li, Wei & Ma), drawn on the seed's streams."""
    from harness import cifar

    # Root from HARNESS_DATA and the download switch from HARNESS_DOWNLOAD (the CLI's --data and
    # --download set them).
    arrays = cifar.load_cifar10(download=os.environ.get("HARNESS_DOWNLOAD") == "1")
    if smoke:
        per_class = min(per_class or smoke_per_class, smoke_per_class)
        test_per_class = min(test_per_class or smoke_per_class, smoke_per_class)
        batch_size = min(batch_size, per_class * 10)
        if patch is not None:
            patch = {**patch, "eval_patch_only": min(dict(patch).get("eval_patch_only", 1000), per_class * 10)}
    tr = (cifar.balanced_subset(arrays.train_y, per_class, subset_seed) if per_class
          else slice(None))
    te = (cifar.balanced_subset(arrays.test_y, test_per_class, subset_seed) if test_per_class
          else slice(None))
    train_x, train_y = cifar.to_tensors(arrays.train_x[tr], arrays.train_y[tr], device=device, dtype=dtype)
    test_x, test_y = cifar.to_tensors(arrays.test_x[te], arrays.test_y[te], device=device, dtype=dtype)
    transform, eval_sets = None, None
    if patch is not None:
        from harness.patch import Patch, PatchRecipe
        transform = Patch(PatchRecipe(**patch), n_train=len(train_y), image_shape=tuple(train_x.shape[1:]),
                          classes=10, gen=gen, dtype=dtype, device=device)
        eval_sets = transform.eval_sets(test_x, test_y, gen)
    return TensorSource(train_x, train_y, batch_size=batch_size, gen=gen, aug_gen=aug_gen,
                        augment=augment, test_x=test_x, test_y=test_y, eval_sets=eval_sets, transform=transform)


def _two_pattern(**kw) -> TensorSource:
    """Li, Wei & Ma's two-pattern toy (harness.two_pattern, imported lazily: it imports this module)."""
    from harness.two_pattern import two_pattern
    return two_pattern(**kw)


SOURCES: dict[str, Callable[..., TensorSource]] = {
    "gaussian_mixture": gaussian_mixture,
    "cifar10": cifar10,
    "two_blobs": two_blobs,
    "two_pattern": _two_pattern,
}


def build_source(name: str, kwargs: dict, **injected) -> TensorSource:
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; known: {sorted(SOURCES)}")
    return SOURCES[name](**injected, **kwargs)
