"""Patched CIFAR-10 of Li, Wei & Ma (NeurIPS 2019), the official code's recipe (CLAIMS.md §6).

On normalized images, the centre `size`×`size` pixels (rows/cols 12..18, all channels) of a fixed
`patched_fraction` of the training images are REPLACED by `z + s·ζ_y`: z ~ z_scale·N(0, 1) shared by
every class, ζ_c ~ U(−zeta_scale, zeta_scale) per class, s = ±1 redrawn at every access. Of the
patched draws, `patch_only_fraction` are patch-only images: every other pixel 0 (the mean colour)
and the patch `z + s·amplitude·U(0, 1)·ζ_y`. The patch is easy to memorize (low noise), hard to fit
from the images (ζ is small next to z). `zeta_scale = 0` is the label-free control.

Streams: the constants (z, ζ, which images are patched) and the evaluation sets come from the data
stream when the source is built; the per-access draws (s, patch-only, amplitude) are part of the
epoch plan on the augmentation stream, so every arm sees the same patched batches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PatchRecipe:
    size: int = 7
    top: int = 12  # first row and column of the patch
    z_scale: float = 1.25
    zeta_scale: float = 0.1  # the official value; a small CPU model needs more (cases/learning_order.py)
    patched_fraction: float = 0.8
    patch_only_fraction: float = 0.2
    patch_only_amplitude: float = 1.75
    eval_patch_only: int = 1000  # blank images with random labels carrying the patch

    def __post_init__(self):
        for name in ("patched_fraction", "patch_only_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"patch recipe: {name} must be in [0, 1], got {getattr(self, name)}")
        if self.size < 1 or self.top < 0 or self.z_scale < 0 or self.zeta_scale < 0 or self.eval_patch_only < 1:
            raise ValueError(f"patch recipe: bad constants {self}")


class Patch:
    """The patch of one seed: constants drawn once from `gen`, then applied to batches."""

    def __init__(self, recipe: PatchRecipe, *, n_train: int, image_shape: tuple[int, int, int], classes: int,
                 gen: torch.Generator, dtype: torch.dtype, device: torch.device):
        c, h, w = image_shape
        if recipe.top + recipe.size > min(h, w):
            raise ValueError(f"patch recipe: a {recipe.size}-pixel patch at {recipe.top} does not fit {h}×{w} images")
        self.recipe, self.classes = recipe, classes
        r = recipe
        self.z = (r.z_scale * torch.randn((c, r.size, r.size), generator=gen)).to(device, dtype)
        self.zeta = (r.zeta_scale * (2 * torch.rand((classes, c, r.size, r.size), generator=gen) - 1)).to(device, dtype)
        patched = torch.zeros(n_train, dtype=torch.bool)
        patched[torch.randperm(n_train, generator=gen)[:round(r.patched_fraction * n_train)]] = True
        self.patched = patched.to(device)
        self.window = slice(r.top, r.top + r.size)

    def draw(self, n: int, gen: torch.Generator) -> dict:
        """Per-access randomness for n examples (s, whether patch-only, the patch-only amplitude)."""
        sign = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
        patch_only = torch.rand(n, generator=gen) < self.recipe.patch_only_fraction
        amplitude = torch.rand(n, generator=gen)
        return {"sign": sign, "patch_only": patch_only, "amplitude": amplitude}

    def _patch(self, y: torch.Tensor, sign: torch.Tensor, amplitude: torch.Tensor | None = None) -> torch.Tensor:
        coef = sign.to(self.z)
        if amplitude is not None:
            coef = coef * self.recipe.patch_only_amplitude * amplitude.to(self.z)
        return self.z + coef[:, None, None, None] * self.zeta[y]

    def apply(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, draws: dict) -> torch.Tensor:
        """Training images `idx` (rows of the training set) with their patches."""
        dev = x.device
        patched = self.patched[idx]
        only = patched & draws["patch_only"].to(dev)
        mixed = patched & ~only
        x = x.clone()
        w = self.window
        if mixed.any():
            x[mixed, :, w, w] = self._patch(y[mixed], draws["sign"].to(dev)[mixed])
        if only.any():
            x[only] = 0
            x[only, :, w, w] = self._patch(y[only], draws["sign"].to(dev)[only], draws["amplitude"].to(dev)[only])
        return x

    def eval_sets(self, test_x: torch.Tensor, test_y: torch.Tensor, gen: torch.Generator) -> dict:
        """'patch_only': blank images with random labels carrying z + s·ζ_y (chance 1/classes);
        'mixed': every test image with its label's patch."""
        n = self.recipe.eval_patch_only
        y = torch.randint(0, self.classes, (n,), generator=gen).to(test_y.device)
        sign = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
        blank = torch.zeros((n, *test_x.shape[1:]), dtype=test_x.dtype, device=test_x.device)
        w = self.window
        blank[:, :, w, w] = self._patch(y, sign.to(test_x.device))
        mixed = test_x.clone()
        sign = torch.randint(0, 2, (len(test_y),), generator=gen) * 2 - 1
        mixed[:, :, w, w] = self._patch(test_y, sign.to(test_x.device))
        return {"patch_only": (blank, y), "mixed": (mixed, test_y)}
