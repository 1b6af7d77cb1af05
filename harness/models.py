"""Models, by registry name. Every model carries `si_names`: the parameters that are scale-invariant
by construction (a bias-free linear/conv weight feeding straight into a normalization layer).

Normalization `eps` is a model argument because exactness depends on it (CLAIMS.md §1: eps = 1e-5
breaks the equivalence; exact cases use eps ≈ 1e-30, torch forbids 0 in train mode).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

NORMS = ("bn", "gn", "ln", "in")


def _norm(kind: str, channels: int, *, spatial: bool, eps: float, affine: bool, groups: int) -> nn.Module:
    if kind == "bn":
        cls = nn.BatchNorm2d if spatial else nn.BatchNorm1d
        return cls(channels, eps=eps, affine=affine)
    if kind == "gn":
        return nn.GroupNorm(groups, channels, eps=eps, affine=affine)
    if kind == "ln":
        # Over all features (and positions): GroupNorm(1, C) is LayerNorm over (C, H, W).
        return nn.GroupNorm(1, channels, eps=eps, affine=affine)
    if kind == "in":
        if not spatial:
            raise ValueError("norm 'in' (instance norm) needs spatial inputs: use it with bn_cnn")
        return nn.GroupNorm(channels, channels, eps=eps, affine=affine)
    raise ValueError(f"unknown norm {kind!r}; choose one of {NORMS}")


def _si_names(model: nn.Module, kinds: tuple[type, ...]) -> tuple[str, ...]:
    return tuple(f"{mod_name}.weight" for mod_name, mod in model.named_modules() if isinstance(mod, kinds))


class NormMLP(nn.Module):
    """in → [Linear(no bias) → Norm → ReLU] × depth → Linear classifier (not SI)."""

    def __init__(self, in_dim: int = 20, width: int = 64, depth: int = 2, classes: int = 5,
                 norm: str = "bn", eps: float = 1e-30, affine: bool = False, groups: int = 8):
        super().__init__()
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(depth):
            layers += [nn.Linear(dim, width, bias=False),
                       _norm(norm, width, spatial=False, eps=eps, affine=affine, groups=groups), nn.ReLU()]
            dim = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(dim, classes)
        self.si_names = tuple(f"features.{n}" for n in _si_names(self.features, (nn.Linear,)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class NormCNN(nn.Module):
    """A small CNN: [Conv3×3(no bias) → Norm → ReLU] per width (stride 2 after the first), GAP, Linear."""

    def __init__(self, in_ch: int = 3, widths: tuple[int, ...] = (8, 16), classes: int = 5,
                 norm: str = "bn", eps: float = 1e-30, affine: bool = True, groups: int = 4):
        super().__init__()
        layers: list[nn.Module] = []
        ch = in_ch
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(ch, w, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       _norm(norm, w, spatial=True, eps=eps, affine=affine, groups=groups), nn.ReLU()]
            ch = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(ch, classes)
        self.si_names = tuple(f"features.{n}" for n in _si_names(self.features, (nn.Conv2d,)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean(dim=(2, 3)))


class ToyLogit(nn.Module):
    """The BN + WD toy (CLAIMS.md §2): logits [0, z] with z = S·BN(Xw) (w ∈ R², BN without affine,
    so w is SI) or, with `bn=False`, the plain logistic model z = S·Xw. Cross-entropy on these two
    logits is softplus(−y z) for y = ±1."""

    def __init__(self, in_dim: int = 2, scale: float = 8.0, bn: bool = True, eps: float = 1e-30):
        super().__init__()
        self.linear = nn.Linear(in_dim, 1, bias=False)
        self.norm = nn.BatchNorm1d(1, eps=eps, affine=False) if bn else nn.Identity()
        self.scale = scale
        self.si_names = ("linear.weight",) if bn else ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.scale * self.norm(self.linear(x))
        return torch.cat([torch.zeros_like(z), z], dim=1)


def resnet18_cifar(classes: int = 10, norm_affine: bool = False, eps: float = 1e-5) -> nn.Module:
    """torchvision's ResNet-18 adapted to 32×32 inputs (3×3 stem, stride 1, no max-pool).

    Post-activation: every conv feeds a BatchNorm, so every conv weight is scale-invariant (a pre-
    activation net is not: its residual sums reach the next BN unnormalized). BN affine parameters
    are frozen when `norm_affine=False`, as in Li & Arora's experiments.
    """
    from torchvision.models import resnet18

    model = resnet18(num_classes=classes, norm_layer=lambda c: nn.BatchNorm2d(c, eps=eps))
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    if not norm_affine:
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.requires_grad_(False)
                mod.bias.requires_grad_(False)
    model.si_names = _si_names(model, (nn.Conv2d,))
    return model


MODELS: dict[str, Callable[..., nn.Module]] = {
    "norm_mlp": NormMLP,
    "norm_cnn": NormCNN,
    "resnet18_cifar": resnet18_cifar,
    "toy_logit": ToyLogit,
}


def build_model(name: str, kwargs: dict, *, generator_seed: int, dtype: torch.dtype,
                device: torch.device) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    # Initialization draws from torch's global RNG; fork it so the init stream is the only input.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        model = MODELS[name](**kwargs)
    return model.to(device=device, dtype=dtype)


def si_parameters(model: nn.Module) -> list[nn.Parameter]:
    named = dict(model.named_parameters())
    return [named[n] for n in model.si_names]


def check_scale_invariance(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor]) -> dict[str, float]:
    """Numerically confirm the declared SI parameters are SI: returns, per parameter, the larger of
    |⟨∇L, w⟩| / (‖∇L‖‖w‖) and ‖c∇L(cw) − ∇L(w)‖ / ‖∇L(w)‖ (both 0 in exact arithmetic).

    Two passes in all: every SI tensor is rescaled at once, each by its own factor c_i, which is
    invisible to the loss exactly when each tensor is SI on its own.
    """
    named = dict(model.named_parameters())
    params = [named[n] for n in model.si_names]
    factors = [2.0 + 0.37 * i for i in range(len(params))]
    was_training = model.training
    model.train()

    def grads() -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss_fn(model).backward()
        return [p.grad.detach().clone() for p in params]

    g1 = grads()
    with torch.no_grad():
        for p, c in zip(params, factors):
            p.mul_(c)
    g2 = grads()
    with torch.no_grad():
        for p, c in zip(params, factors):
            p.div_(c)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    out = {}
    for name, p, a, b, c in zip(model.si_names, params, g1, g2, factors):
        orth = (a * p).sum().abs() / (a.norm() * p.norm() + 1e-300)
        homog = (c * b - a).norm() / (a.norm() + 1e-300)
        out[name] = float(max(orth, homog))
    return out
