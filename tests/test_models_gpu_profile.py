"""The GPU-profile models (PreResNet-32, WRN-16-4, ResNet-18 options) and GhostBatchNorm2d, on the CPU.

Scale invariance is checked with harness.models.check_scale_invariance in float64 with BN eps 1e-30:
the errors it returns are relative (|⟨∇L, w⟩|/(‖∇L‖‖w‖) and ‖c∇L(cw) − ∇L(w)‖/‖∇L(w)‖), exactly 0 in
exact arithmetic for an SI weight; measured ≤ 3e-14 here (roundoff of a few dozen float64 layers).
With eps = 1e-30 the eps term moves the normalized output by about eps/var ≈ 1e-30 relative, far
below float64 roundoff, so the bound 1e-10 leaves ~3 orders of margin over roundoff while a non-SI
weight measures ≥ 1e-1 (the negative controls below check > 1e-3).
"""
import dataclasses

import pytest
import torch
from torch import nn

from harness.models import (MODELS, GhostBatchNorm2d, build_model, check_group_scale_invariance,
                            check_scale_invariance)

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")
SI_BOUND = 1e-10      # true SI weights: ≤ 3e-14 measured
NOT_SI_FLOOR = 1e-3   # a non-SI weight declared SI: ≥ 1e-1 measured


def _model(name, **kwargs):
    return build_model(name, {"eps": 1e-30, **kwargs}, generator_seed=0, dtype=torch.float64, device=CPU)


def _loss_fn(batch=4, classes=10, hw=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, hw, hw, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (batch,), generator=g)
    return lambda m: nn.functional.cross_entropy(m(x), y)


def test_new_models_are_registered():
    for name in ("resnet18_cifar", "preresnet32", "wrn16_4"):
        assert name in MODELS


def test_architectures():
    pre = _model("preresnet32")
    assert [len(getattr(pre, f"layer{i}")) for i in (1, 2, 3)] == [5, 5, 5]
    assert [getattr(pre, f"layer{i}")[0].conv1.out_channels for i in (1, 2, 3)] == [16, 32, 64]
    assert sum(p.numel() for p in pre.parameters()) == 466_714  # ≈ 0.46M, as in He et al. 2016
    assert pre.layer1[0].shortcut is None and pre.layer2[0].shortcut is not None
    wrn = _model("wrn16_4")
    assert [len(getattr(wrn, f"layer{i}")) for i in (1, 2, 3)] == [2, 2, 2]
    assert [getattr(wrn, f"layer{i}")[0].conv1.out_channels for i in (1, 2, 3)] == [64, 128, 256]
    assert sum(p.numel() for p in wrn.parameters()) == 2_748_890  # 2.7M, Zagoruyko & Komodakis Table 1
    assert all(isinstance(m, nn.Identity) for b in wrn.layer1 for m in [b.dropout])  # dropout 0
    with pytest.raises(ValueError, match="6n \\+ 2"):
        build_model("preresnet_cifar", {"depth": 30}, generator_seed=0, dtype=torch.float64, device=CPU)
    with pytest.raises(ValueError, match="6n \\+ 4"):
        build_model("wrn_cifar", {"depth": 15}, generator_seed=0, dtype=torch.float64, device=CPU)


def test_declared_si_weights():
    """Pre-activation nets: block conv1s only, plus the WRN stem (its first block projects 16 → 64)."""
    pre = _model("preresnet32")
    assert pre.si_names == tuple(f"layer{s}.{b}.conv1.weight" for s in (1, 2, 3) for b in range(5))
    assert [len(g) for g in pre.si_groups] == [6, 6, 6]  # stem + 5 conv2; shortcut + 5 conv2 (×2)
    assert pre.si_groups[0][0] == "conv1.weight"
    wrn = _model("wrn16_4")
    assert wrn.si_names == ("conv1.weight",) + tuple(f"layer{s}.{b}.conv1.weight" for s in (1, 2, 3)
                                                     for b in range(2))
    assert all(g[0].endswith("shortcut.weight") or g[0].endswith("conv2.weight") for g in wrn.si_groups)
    # A WRN whose first block needs no projection (widen 1) has a non-SI stem, as PreResNet does.
    assert "conv1.weight" not in _model("wrn_cifar", depth=10, widen=1).si_names


@pytest.mark.parametrize("name, kwargs", [
    ("preresnet32", {}),
    ("wrn16_4", {}),
    ("wrn16_4", {"ghost_batch": 2, "norm_affine": True}),
    ("resnet18_cifar", {"ghost_batch": 2}),
])
def test_declared_si_weights_are_scale_invariant(name, kwargs):
    model = _model(name, **kwargs)
    errors = check_scale_invariance(model, _loss_fn())
    assert len(errors) == len(model.si_names) > 0
    assert max(errors.values()) < SI_BOUND, errors


@pytest.mark.parametrize("name", ["preresnet32", "wrn16_4", "resnet18_cifar"])
def test_si_names_are_exactly_the_weights_orthogonal_to_their_gradient(name):
    """One backward pass classifies every conv/linear weight: ⟨∇L, w⟩ = 0 (Euler's identity for a
    degree-0 homogeneous loss) holds for the declared SI weights and for no other."""
    model = _model(name)
    _loss_fn()(model).backward()
    orth = {n: float((p.grad * p.detach()).sum().abs() / (p.grad.norm() * p.detach().norm()))
            for n, p in model.named_parameters() if p.grad is not None and p.dim() > 1}
    assert {n for n, v in orth.items() if v < SI_BOUND} == set(model.si_names)
    # First order only: the smallest non-SI value measured is 3.6e-4 (still 10 orders above roundoff).
    assert min(v for n, v in orth.items() if n not in model.si_names) > 1e-6


@pytest.mark.parametrize("name", ["preresnet32", "wrn16_4"])
def test_residual_writers_are_scale_invariant_jointly(name):
    model = _model(name)
    errors = check_group_scale_invariance(model, _loss_fn())
    assert len(errors) == 3 and max(errors.values()) < SI_BOUND, errors


@pytest.mark.parametrize("name, weight", [
    ("preresnet32", "conv1.weight"),            # the stem: feeds bn1 AND the identity shortcut
    ("preresnet32", "layer1.0.conv2.weight"),   # added to the residual stream
    ("preresnet32", "layer2.0.shortcut.weight"),
    ("preresnet32", "fc.weight"),
    ("wrn16_4", "layer2.1.conv2.weight"),
    ("wrn16_4", "layer1.0.shortcut.weight"),
])
def test_negative_control_non_si_weight_fails_the_check(name, weight):
    model = _model(name)
    model.si_names = (weight,)
    error = check_scale_invariance(model, _loss_fn())[weight]
    assert error > NOT_SI_FLOOR, (weight, error)


def test_negative_control_one_writer_of_a_group_is_not_enough():
    """Rescaling only part of a jointly-SI group (the stem without the stage-1 conv2s) changes the loss."""
    model = _model("preresnet32")
    group = model.si_groups[0]
    error = check_group_scale_invariance(model, _loss_fn(), groups=(group[:3],))[group[:3]]
    assert error > NOT_SI_FLOOR


@pytest.mark.parametrize("name", ["resnet18_cifar", "preresnet32", "wrn16_4"])
def test_freeze_options(name):
    model = _model(name)
    default = dict(model.named_parameters())
    norm_names = {f"{m}.{p}" for m, mod in model.named_modules()
                  if isinstance(mod, nn.modules.batchnorm._NormBase) for p, _ in mod.named_parameters()}
    assert norm_names and all(not default[n].requires_grad for n in norm_names)  # norm_affine=False default
    assert default["fc.weight"].requires_grad
    model = _model(name, norm_affine=True, freeze_classifier=True)
    params = dict(model.named_parameters())
    assert all(params[n].requires_grad for n in norm_names)
    assert not params["fc.weight"].requires_grad and not params["fc.bias"].requires_grad
    assert all(params[n].requires_grad for n in model.si_names)


def test_resnet18_defaults_unchanged():
    """The new options leave resnet18_cifar's init draws and structure as they were."""
    a = build_model("resnet18_cifar", {"classes": 10}, generator_seed=3, dtype=torch.float32, device=CPU)
    b = build_model("resnet18_cifar", {"classes": 10, "ghost_batch": 8}, generator_seed=3,
                    dtype=torch.float32, device=CPU)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert type(a.bn1) is nn.BatchNorm2d and isinstance(b.bn1, GhostBatchNorm2d)
    assert len(a.si_names) == 20


# ---- GhostBatchNorm2d ----------------------------------------------------------------------------

def _chunks_reference(x, ghost, momentum, affine_from=None, steps=1):
    """nn.BatchNorm2d fed the ghost batches one by one (the definition)."""
    bn = nn.BatchNorm2d(x.shape[1], eps=1e-5, momentum=momentum, dtype=x.dtype)
    if affine_from is not None:
        bn.load_state_dict(affine_from.state_dict())
    outs = []
    for _ in range(steps):
        outs = [bn(c) for c in torch.split(x, ghost)]
    return torch.cat(outs), bn


@pytest.mark.parametrize("batch", [12, 14, 3])  # divisible, smaller last chunk, B < ghost_batch
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_bn_matches_batchnorm_per_ghost_batch(batch, momentum):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 5, 4, 4, generator=g, dtype=torch.float64) * 3 + 1
    ghost = GhostBatchNorm2d(5, ghost_batch=4, momentum=momentum).double()
    with torch.no_grad():
        ghost.weight.uniform_(0.5, 2, generator=g)
        ghost.bias.uniform_(-1, 1, generator=g)
    start = {k: v.clone() for k, v in ghost.state_dict().items()}
    ref = nn.BatchNorm2d(5, momentum=momentum).double()
    ref.load_state_dict(start)
    for _ in range(2):  # two training steps: running statistics accumulate across calls
        y = ghost(x)
        y_ref = torch.cat([ref(c) for c in torch.split(x, 4)])
    assert torch.allclose(y, y_ref, rtol=0, atol=1e-12)
    for key in ("running_mean", "running_var"):
        assert torch.allclose(getattr(ghost, key), getattr(ref, key), rtol=1e-12, atol=1e-14), key
    assert int(ghost.num_batches_tracked) == int(ref.num_batches_tracked) == 2 * len(torch.split(x, 4))
    ghost.eval()
    ref.eval()
    assert torch.allclose(ghost(x), ref(x), rtol=0, atol=1e-12)  # eval: running statistics


def test_ghost_bn_statistics_do_not_depend_on_the_batch_size():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(24, 3, 4, 4, generator=g, dtype=torch.float64)
    ghost = GhostBatchNorm2d(3, ghost_batch=8, affine=False).double()
    whole = ghost(x)
    assert torch.allclose(ghost(x[:8]), whole[:8], rtol=0, atol=1e-13)
    assert torch.allclose(ghost(x[8:16]), whole[8:16], rtol=0, atol=1e-13)
    plain = nn.BatchNorm2d(3, affine=False).double()(x)
    assert (plain[:8] - whole[:8]).abs().max() > 1e-3  # and it is not batch norm over all 24


def test_ghost_bn_gradients_match_the_definition():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64)
    ghost = GhostBatchNorm2d(3, ghost_batch=4).double()
    (ghost(x) * w).sum().backward()
    gx, gw = x.grad.clone(), ghost.weight.grad.clone()
    x.grad = None
    ref = nn.BatchNorm2d(3).double()
    (torch.cat([ref(c) for c in torch.split(x, 4)]) * w).sum().backward()
    assert torch.allclose(gx, x.grad, rtol=0, atol=1e-12)
    assert torch.allclose(gw, ref.weight.grad, rtol=1e-12, atol=1e-12)


def test_ghost_bn_rejects_bad_size():
    with pytest.raises(ValueError, match="ghost_batch"):
        GhostBatchNorm2d(4, ghost_batch=0)


# ---- the dry run: every new model through the runner, as `pytest -m gpu --device cpu --smoke` -----

def _smoke_case(model):
    from cases.wd_exp_lr import wd_vs_exp_case
    base = wd_vs_exp_case("gpu-profile-smoke", steps=6)
    return dataclasses.replace(base, id=f"smoke-{model[0]}", profile="gpu", dtype="float32", smoke_steps=2,
                               model=model, data=("gaussian_mixture", {"n": 32, "shape": (3, 32, 32),
                                                                       "classes": 10, "batch_size": 8}))


@pytest.mark.parametrize("model", [
    ("preresnet32", {"classes": 10}),
    ("wrn16_4", {"classes": 10, "ghost_batch": 4, "freeze_classifier": True}),
], ids=lambda m: m[0])
def test_smoke_run_on_cpu(model):
    from harness.runner import RunEnv
    from harness.session import execute
    case = _smoke_case(model)
    outcome = execute(case, RunEnv(device="cpu", smoke=True))
    assert outcome.status == "smoke", outcome.message
    assert set(outcome.results.arm) == {a.name for a in case.arms}
    assert outcome.results.step.max() == 2
