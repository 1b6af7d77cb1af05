"""The patched CIFAR-10 transform (harness/patch.py) against the official recipe, on synthetic images."""
from __future__ import annotations

import pytest
import torch

from harness.datasets import TensorSource, slice_draws
from harness.patch import Patch, PatchRecipe

W = slice(12, 19)


def _patch(recipe=PatchRecipe(), n=500, seed=0):
    return Patch(recipe, n_train=n, image_shape=(3, 32, 32), classes=10, gen=torch.Generator().manual_seed(seed),
                 dtype=torch.float32, device=torch.device("cpu"))


def _images(n=500):
    g = torch.Generator().manual_seed(9)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _outside(x):
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[..., W, W] = False
    return x[mask]


def test_constants_follow_the_recipe():
    p = _patch(PatchRecipe(zeta_scale=0.2))
    assert p.z.shape == (3, 7, 7) and 1.0 < p.z.std() < 1.5  # 1.25·N(0, 1)
    assert p.zeta.shape == (10, 3, 7, 7) and p.zeta.abs().max() <= 0.2 and p.zeta.abs().max() > 0.15
    assert int(p.patched.sum()) == 400  # exactly 80% of the training images, fixed
    assert torch.equal(_patch(PatchRecipe(zeta_scale=0.2)).z, p.z)  # the seed's data stream decides
    assert not torch.equal(_patch(PatchRecipe(zeta_scale=0.2), seed=1).z, p.z)


def test_apply_replaces_the_centre_of_the_patched_images_only():
    p = _patch()
    x, y = _images()
    idx = torch.arange(500)
    draws = p.draw(500, torch.Generator().manual_seed(1))
    out = p.apply(x, y, idx, draws)
    only = p.patched & draws["patch_only"]
    mixed = p.patched & ~draws["patch_only"]
    clean = ~p.patched
    assert torch.equal(out[clean], x[clean])
    assert torch.equal(_outside(out[mixed]), _outside(x[mixed]))  # the rest of the image is untouched
    expected = p.z + draws["sign"][mixed].float()[:, None, None, None] * p.zeta[y[mixed]]
    assert torch.allclose(out[mixed][..., W, W], expected)
    assert (_outside(out[only]) == 0).all()  # patch-only: every other pixel is the mean colour
    amp = 1.75 * draws["amplitude"][only] * draws["sign"][only].float()
    assert torch.allclose(out[only][..., W, W], p.z + amp[:, None, None, None] * p.zeta[y[only]])
    assert 0.12 < only.sum() / p.patched.sum() < 0.28  # 20% of patched draws
    assert set(draws["sign"].tolist()) == {-1, 1}


def test_label_free_patch_is_the_same_for_every_class():
    p = _patch(PatchRecipe(zeta_scale=0.0))
    x, y = _images()
    draws = p.draw(500, torch.Generator().manual_seed(1))
    draws["patch_only"][:] = False
    out = p.apply(x, y, torch.arange(500), draws)
    centres = out[p.patched][..., W, W]
    assert torch.equal(centres, p.z.expand_as(centres))


def test_eval_sets():
    p = _patch(PatchRecipe(eval_patch_only=300))
    x, y = _images(200)
    sets = p.eval_sets(x, y, torch.Generator().manual_seed(2))
    blank, labels = sets["patch_only"]
    assert blank.shape == (300, 3, 32, 32) and (_outside(blank) == 0).all()
    assert len(set(labels.tolist())) == 10
    sign = ((blank[..., W, W] - p.z) * p.zeta[labels]).flatten(1).sum(1).sign()
    assert torch.allclose(blank[..., W, W], p.z + sign[:, None, None, None] * p.zeta[labels], atol=1e-6)
    mixed, my = sets["mixed"]
    assert torch.equal(my, y) and torch.equal(_outside(mixed), _outside(x))


def test_draws_are_part_of_the_shared_epoch_plan():
    p = _patch(n=96)
    x, y = _images(96)
    src = TensorSource(x, y, batch_size=8, gen=torch.Generator().manual_seed(1),
                       aug_gen=torch.Generator().manual_seed(2), transform=p)
    order, draws = src.epoch_plan()
    whole, _ = src.take(order, draws)
    for b in (8, 32):
        parts = [src.take(order[lo:lo + b], slice_draws(draws, lo, lo + b))[0] for lo in range(0, 96, b)]
        assert torch.equal(torch.cat(parts), whole)
    assert not torch.equal(whole, x[order])  # the patch was applied


@pytest.mark.parametrize("bad", [dict(patched_fraction=1.5), dict(patch_only_fraction=-0.1), dict(size=0),
                                 dict(zeta_scale=-1.0)])
def test_bad_recipe(bad):
    with pytest.raises(ValueError, match="patch recipe"):
        PatchRecipe(**bad)


def test_patch_must_fit_the_image():
    with pytest.raises(ValueError, match="does not fit"):
        Patch(PatchRecipe(top=28), n_train=10, image_shape=(3, 32, 32), classes=10,
              gen=torch.Generator().manual_seed(0), dtype=torch.float32, device=torch.device("cpu"))
