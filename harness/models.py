"""Models, by registry name. Every model carries `si_names`: the parameters that are scale-invariant
by construction (a bias-free linear/conv weight feeding straight into a normalization layer, and
nothing else: in a pre-activation ResNet the convs that write into the residual stream are not SI on
their own, see PreActResNet). The GPU profile's ResNets: resnet18_cifar, preresnet32, wrn16_4.

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
    """in → [Linear(no bias) → Norm → ReLU] × depth → Linear classifier (not SI).

    `unnormalized`: indices of hidden layers built without their norm (a bias-free Linear → ReLU,
    not SI: a negative control for the sphere claims); `norm="none"` builds every layer so (a net
    without any normalization, for the accumulation claim). `sphere_names` lists every hidden
    weight, normalized or not, so the sphere measurements see the unnormalized one too.
    """

    def __init__(self, in_dim: int = 20, width: int = 64, depth: int = 2, classes: int = 5,
                 norm: str = "bn", eps: float = 1e-30, affine: bool = False, groups: int = 8,
                 unnormalized: tuple[int, ...] = ()):
        super().__init__()
        layers: list[nn.Module] = []
        dim, si = in_dim, []
        for i in range(depth):
            layers.append(nn.Linear(dim, width, bias=False))
            if i in unnormalized or norm == "none":
                layers.append(nn.Identity())  # keeps module indices the same as the normalized net
            else:
                si.append(f"features.{len(layers) - 1}.weight")
                layers.append(_norm(norm, width, spatial=False, eps=eps, affine=affine, groups=groups))
            layers.append(nn.ReLU())
            dim = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(dim, classes)
        self.si_names = tuple(si)
        self.sphere_names = tuple(f"features.{n}" for n in _si_names(self.features, (nn.Linear,)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ActivationNoise(nn.Module):
    """Gaussian noise σ·ξ added before a ReLU in train mode, ξ one (1, 1, H, W) map shared across the
    batch and the channels (the mitigation of Li, Wei & Ma 2019, official code). σ is set by the
    runner from the arm's `act_noise` schedule, and ξ drawn from the generator the runner gives
    (the arm's own seeded stream); σ = 0 or eval mode is the identity."""

    def __init__(self):
        super().__init__()
        self.sigma = 0.0
        self.generator: torch.Generator | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.sigma == 0.0:
            return x
        if self.generator is None:
            raise RuntimeError("ActivationNoise needs a generator (set by the runner for arms with act_noise)")
        noise = torch.randn((1, 1, *x.shape[2:]), generator=self.generator, dtype=torch.float32)
        return x + self.sigma * noise.to(device=x.device, dtype=x.dtype)


class NormCNN(nn.Module):
    """A small CNN: [Conv3×3(no bias) → Norm → ReLU] per width, GAP, Linear. Downsampling after the
    first conv: stride 2 (`pool="stride"`) or a 2×2 max-pool after each later block (`pool="max"`).
    `ghost_batch=G` uses GhostBatchNorm2d (statistics over fixed ghost batches of G); `act_noise`
    puts an ActivationNoise before every ReLU."""

    def __init__(self, in_ch: int = 3, widths: tuple[int, ...] = (8, 16), classes: int = 5,
                 norm: str = "bn", eps: float = 1e-30, affine: bool = True, groups: int = 4,
                 ghost_batch: int | None = None, pool: str = "stride", act_noise: bool = False):
        super().__init__()
        if pool not in ("stride", "max"):
            raise ValueError(f"pool must be 'stride' or 'max', got {pool!r}")
        if ghost_batch is not None and norm != "bn":
            raise ValueError(f"ghost_batch needs norm='bn', got norm={norm!r}")
        layers: list[nn.Module] = []
        ch = in_ch
        for i, w in enumerate(widths):
            stride = 2 if i > 0 and pool == "stride" else 1
            norm_layer = (GhostBatchNorm2d(w, ghost_batch=ghost_batch, eps=eps, affine=affine)
                          if ghost_batch is not None else
                          _norm(norm, w, spatial=True, eps=eps, affine=affine, groups=groups))
            layers += [nn.Conv2d(ch, w, 3, stride=stride, padding=1, bias=False), norm_layer]
            layers += [ActivationNoise()] if act_noise else []
            layers += [nn.ReLU()]
            if i > 0 and pool == "max":
                layers.append(nn.MaxPool2d(2))
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


def resnet18_cifar(classes: int = 10, norm_affine: bool = False, eps: float = 1e-5,
                   freeze_classifier: bool = False, ghost_batch: int | None = None) -> nn.Module:
    """torchvision's ResNet-18 adapted to 32×32 inputs (3×3 stem, stride 1, no max-pool).

    Post-activation: every conv feeds a BatchNorm, so every conv weight is scale-invariant (a pre-
    activation net is not: its residual sums reach the next BN unnormalized). BN affine parameters
    are frozen when `norm_affine=False`, as in Li & Arora's experiments. `freeze_classifier=True`
    freezes `fc`; `ghost_batch=G` swaps every BatchNorm2d for GhostBatchNorm2d(G) (same init draws).
    """
    from torchvision.models import resnet18

    model = resnet18(num_classes=classes, norm_layer=_norm2d(eps, ghost_batch))
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    _freeze(model, norm_affine=norm_affine, classifier=model.fc if freeze_classifier else None)
    model.si_names = _si_names(model, (nn.Conv2d,))
    return model


def _norm2d(eps: float, ghost_batch: int | None) -> Callable[[int], nn.Module]:
    if ghost_batch is None:
        return lambda c: nn.BatchNorm2d(c, eps=eps)
    return lambda c: GhostBatchNorm2d(c, ghost_batch=ghost_batch, eps=eps)


def _freeze(model: nn.Module, *, norm_affine: bool, classifier: nn.Module | None) -> None:
    """`norm_affine=False`: every norm layer's weight and bias are frozen (requires_grad False).
    `classifier`: freeze that module's parameters too."""
    if not norm_affine:
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.affine:
                mod.weight.requires_grad_(False)
                mod.bias.requires_grad_(False)
    if classifier is not None:
        for p in classifier.parameters():
            p.requires_grad_(False)


class GhostBatchNorm2d(nn.BatchNorm2d):
    """Ghost batch normalization (Hoffer, Hubara & Soudry 2017): in train mode, the statistics are
    taken over fixed *ghost batches* of `ghost_batch` consecutive examples, whatever the batch size B.
    B is split into ⌊B/G⌋ ghost batches of G examples and, when G does not divide B, a smaller last one
    of B mod G (so B ≤ G is plain batch norm). Eval mode uses the running statistics, which are
    updated once per ghost batch, in order, exactly as a BatchNorm2d fed the ghost batches one by one
    would update them (momentum=None: cumulative average over ghost batches).

    Each ghost batch is normalized by its own mean and variance, so the layer is scale-invariant in
    its input, as batch norm is. The fused kernel does the work: the ghost batches are laid side by
    side as channel groups and normalized in one F.batch_norm call.

    `stats_group` (set by harness.distributed): a process group, or a function returning one or
    None, over which the per-ghost-batch
    statistics are all-gathered before the running statistics are updated, so that data-parallel
    ranks holding consecutive shards of the global batch track the same running statistics as one
    process fed the whole batch. The normalization itself needs no communication when every shard
    is a whole number of ghost batches.
    """

    def __init__(self, num_features: int, ghost_batch: int = 128, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True, track_running_stats: bool = True,
                 device=None, dtype=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        if not (isinstance(ghost_batch, int) and ghost_batch >= 1):
            raise ValueError(f"ghost_batch must be a positive int, got {ghost_batch!r}")
        self.ghost_batch = ghost_batch
        self.stats_group = None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", ghost_batch={self.ghost_batch}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            use_batch = self.running_mean is None  # track_running_stats=False: batch statistics
            if not use_batch:
                return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                                self.bias, False, 0.0, self.eps)
        n, c, h, w = x.shape
        full, rem = divmod(n, self.ghost_batch)
        g = self.ghost_batch
        parts = []
        if full:
            head = x[:full * g]
            # (full·g, c, h, w) -> (g, full·c, h, w): ghost batch j's channel k is channel j·c + k.
            z = head.reshape(full, g, c, h, w).transpose(0, 1).reshape(g, full * c, h, w)
            z = nn.functional.batch_norm(z, None, None, None, None, True, 0.0, self.eps)
            parts.append(z.reshape(g, full, c, h, w).transpose(0, 1).reshape(full * g, c, h, w))
        if rem:
            parts.append(nn.functional.batch_norm(x[full * g:], None, None, None, None, True, 0.0, self.eps))
        y = parts[0] if len(parts) == 1 else torch.cat(parts)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        if self.training and self.track_running_stats:
            self._update_running_stats(x.detach(), full, rem)
        return y

    @torch.no_grad()
    def _update_running_stats(self, x: torch.Tensor, full: int, rem: int) -> None:
        n, c, h, w = x.shape
        g = self.ghost_batch
        means, variances = [], []
        if full:
            xs = x[:full * g].reshape(full, g, c, h * w).transpose(1, 2).reshape(full, c, g * h * w)
            means.append(xs.mean(dim=2))
            variances.append(xs.var(dim=2, correction=1))  # unbiased, as BatchNorm's running_var
        if rem:
            xr = x[full * g:].transpose(0, 1).reshape(c, -1)
            means.append(xr.mean(dim=1)[None])
            variances.append(xr.var(dim=1, correction=1)[None])
        mean, var = torch.cat(means), torch.cat(variances)  # (k, c), in batch order
        group = self.stats_group() if callable(self.stats_group) else self.stats_group
        if group is not None:
            import torch.distributed as dist
            stacked = torch.stack([mean, var])
            gathered = [torch.empty_like(stacked) for _ in range(dist.get_world_size(group))]
            dist.all_gather(gathered, stacked.contiguous(), group=group)
            mean = torch.cat([s[0] for s in gathered])  # rank order = order in the global batch
            var = torch.cat([s[1] for s in gathered])
        k = mean.shape[0]
        if self.momentum is None:  # cumulative average over every ghost batch seen
            t = int(self.num_batches_tracked)
            self.running_mean.mul_(t).add_(mean.sum(0)).div_(t + k)
            self.running_var.mul_(t).add_(var.sum(0)).div_(t + k)
        else:  # k sequential exponential updates, in closed form
            m = float(self.momentum)
            weights = m * (1 - m) ** torch.arange(k - 1, -1, -1, dtype=torch.float64)
            weights = weights.to(mean)
            self.running_mean.mul_((1 - m) ** k).add_(weights @ mean)
            self.running_var.mul_((1 - m) ** k).add_(weights @ var)
        self.num_batches_tracked.add_(k)


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016, "Identity mappings"; the WRN block of Zagoruyko &
    Komodakis 2016): BN → ReLU → conv3×3(stride) → BN → ReLU → [dropout] → conv3×3, added to the
    shortcut. The shortcut is the identity, or, when the shape changes, a 1×1 projection of the
    *pre-activated* input relu(bn1(x)) (so the block's input then reaches nothing unnormalized)."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm_layer: Callable[[int], nn.Module],
                 dropout: float = 0.0):
        super().__init__()
        from torchvision.models.resnet import conv1x1, conv3x3

        self.bn1 = norm_layer(in_planes)
        self.conv1 = conv3x3(in_planes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.shortcut = conv1x1(in_planes, planes, stride) if stride != 1 or in_planes != planes else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(nn.functional.relu(self.bn2(out))))
        return out + shortcut


class PreActResNet(nn.Module):
    """conv3×3(3→16) stem → stages of PreActBlocks (the first block of every stage after the first
    has stride 2) → BN → ReLU → global average pool → Linear `fc`.

    Scale invariance (per tensor, what `si_names` lists): a weight is SI when everything it feeds is
    normalized before it is used. In a pre-activation net that holds for every block's `conv1` (it
    feeds only bn2) and NOT for `conv2` or the projection `shortcut`: their outputs are added to the
    residual stream, x + c·F(x) ≠ c·(x + F(x)). The stem conv is SI only when the first block has a
    projection shortcut (then the stem's output reaches only bn1: WRN-16-4, 16 → 64 channels); with
    an identity first block (PreResNet-32, 16 → 16) the stem's output is itself part of the stream.

    The residual writers are SI *jointly*: each stream segment, from its start (the stem or a
    projection shortcut) to the next normalization that consumes it alone (the next projection
    block's bn1, or the final bn), is linear in the writers {start, every conv2 on the segment}.
    `si_groups` lists those groups (scale one group by one c and the function is unchanged); a
    group of one is listed in `si_names` instead. The tests check both numerically (float64, eps
    1e-30), and that declaring a conv2, a shortcut, the stem of PreResNet-32 or `fc` SI fails.
    """

    def __init__(self, blocks_per_stage: int, widths: tuple[int, ...], classes: int,
                 norm_layer: Callable[[int], nn.Module], dropout: float = 0.0, stem: int = 16):
        super().__init__()
        from torchvision.models.resnet import conv3x3

        self.conv1 = conv3x3(3, stem)
        planes = stem
        for i, width in enumerate(widths):
            blocks = [PreActBlock(planes if j == 0 else width, width, (1 if i == 0 else 2) if j == 0 else 1,
                                  norm_layer, dropout) for j in range(blocks_per_stage)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            planes = width
        self.n_stages = len(widths)
        self.bn = norm_layer(planes)
        self.fc = nn.Linear(planes, classes)
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
        self.si_names, self.si_groups = self._scale_invariance()

    def _scale_invariance(self) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
        groups, current, conv1s = [], ["conv1.weight"], []
        for i in range(self.n_stages):
            for j, block in enumerate(getattr(self, f"layer{i + 1}")):
                name = f"layer{i + 1}.{j}"
                conv1s.append(f"{name}.conv1.weight")
                if block.shortcut is not None:  # the segment so far is consumed by this bn1 alone
                    groups.append(current)
                    current = [f"{name}.shortcut.weight"]
                current.append(f"{name}.conv2.weight")
        groups.append(current)
        si = {n for g in groups if len(g) == 1 for n in g} | set(conv1s)
        order = [n for n, _ in self.named_parameters()]
        return (tuple(n for n in order if n in si),
                tuple(tuple(sorted(g, key=order.index)) for g in groups if len(g) > 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        for i in range(self.n_stages):
            out = getattr(self, f"layer{i + 1}")(out)
        out = nn.functional.relu(self.bn(out))
        return self.fc(out.mean(dim=(2, 3)))


def preresnet_cifar(depth: int = 32, classes: int = 10, widths: tuple[int, ...] = (16, 32, 64),
                    norm_affine: bool = False, eps: float = 1e-5, ghost_batch: int | None = None,
                    freeze_classifier: bool = False) -> nn.Module:
    """Pre-activation ResNet for CIFAR (He et al. 2016): depth = 6n + 2, n basic blocks per stage,
    widths 16/32/64, 1×1 projection shortcuts at the stride-2 stage starts. See PreActResNet for
    which weights are scale-invariant. Options as resnet18_cifar."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"preresnet depth must be 6n + 2 (8, 14, 20, 32, 56, 110, ...), got {depth}")
    model = PreActResNet((depth - 2) // 6, tuple(widths), classes, _norm2d(eps, ghost_batch))
    _freeze(model, norm_affine=norm_affine, classifier=model.fc if freeze_classifier else None)
    return model


def preresnet32(**kwargs) -> nn.Module:
    """PreResNet-32: 3 stages × 5 pre-activation basic blocks, widths 16/32/64 (0.46M parameters).
    SI per tensor: the 15 block conv1 weights only (stem, conv2s and shortcuts are SI jointly)."""
    return preresnet_cifar(depth=32, **kwargs)


def wide_resnet_cifar(depth: int = 16, widen: int = 4, classes: int = 10, dropout: float = 0.0,
                      norm_affine: bool = False, eps: float = 1e-5, ghost_batch: int | None = None,
                      freeze_classifier: bool = False, act_noise: bool = False) -> nn.Module:
    """Wide ResNet WRN-depth-widen (Zagoruyko & Komodakis 2016): depth = 6n + 4, widths 16k/32k/64k,
    pre-activation blocks, dropout between the convs (0 here unless asked: dropout draws from the
    global RNG, which the harness does not seed per stream). `ghost_batch=G` uses GhostBatchNorm2d.
    Options as resnet18_cifar; scale invariance as PreActResNet. `act_noise`: an ActivationNoise
    after every norm layer (each one feeds a ReLU in a pre-activation net)."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"wide resnet depth must be 6n + 4 (10, 16, 22, 28, 40, ...), got {depth}")
    norm = _norm2d(eps, ghost_batch)
    if act_noise:
        plain_norm = norm
        norm = lambda c: nn.Sequential(plain_norm(c), ActivationNoise())  # noqa: E731
    model = PreActResNet((depth - 4) // 6, (16 * widen, 32 * widen, 64 * widen), classes, norm, dropout=dropout)
    _freeze(model, norm_affine=norm_affine, classifier=model.fc if freeze_classifier else None)
    return model


def wrn16_4(**kwargs) -> nn.Module:
    """WRN-16-4, dropout 0 (2.75M parameters). SI per tensor: the stem (its 16 → 64 first block has
    a projection shortcut) and the 6 block conv1 weights."""
    return wide_resnet_cifar(depth=16, widen=4, **kwargs)


def wrn16_10(**kwargs) -> nn.Module:
    """WRN-16-10 (17.1M parameters): Li, Wei & Ma's official model for the patched CIFAR-10 claim."""
    return wide_resnet_cifar(depth=16, widen=10, **kwargs)


def _two_layer_relu(**kw) -> nn.Module:
    """The two-pattern toy's net (harness.two_pattern, imported lazily: it imports this module)."""
    from harness.two_pattern import TwoLayerReLU
    return TwoLayerReLU(**kw)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "norm_mlp": NormMLP,
    "norm_cnn": NormCNN,
    "resnet18_cifar": resnet18_cifar,
    "preresnet32": preresnet32,
    "wrn16_4": wrn16_4,
    "wrn16_10": wrn16_10,
    "preresnet_cifar": preresnet_cifar,  # any depth 6n + 2 (small ones for smoke and unit tests)
    "wrn_cifar": wide_resnet_cifar,  # any depth 6n + 4 and widen factor
    "toy_logit": ToyLogit,
    "two_layer_relu": _two_layer_relu,
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


def check_group_scale_invariance(model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor],
                                 groups: tuple[tuple[str, ...], ...] | None = None) -> dict[tuple[str, ...], float]:
    """The joint version of check_scale_invariance: every group of tensors (default the model's
    `si_groups`) is rescaled by one factor c_g. Returns, per group, the larger of
    |Σ⟨∇L, w⟩| / (‖∇L‖‖w‖) and ‖c∇L(cw) − ∇L(w)‖ / ‖∇L(w)‖, both over the group's tensors together."""
    groups = tuple(groups if groups is not None else getattr(model, "si_groups", ()))
    named = dict(model.named_parameters())
    params = [[named[n] for n in g] for g in groups]
    factors = [2.0 + 0.37 * i for i in range(len(groups))]
    was_training = model.training
    model.train()

    def grads() -> list[list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss_fn(model).backward()
        return [[p.grad.detach().clone() for p in ps] for ps in params]

    g1 = grads()
    with torch.no_grad():
        for ps, c in zip(params, factors):
            for p in ps:
                p.mul_(c)
    g2 = grads()
    with torch.no_grad():
        for ps, c in zip(params, factors):
            for p in ps:
                p.div_(c)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    out = {}
    for group, ps, a, b, c in zip(groups, params, g1, g2, factors):
        a_flat = torch.cat([t.reshape(-1) for t in a])
        b_flat = torch.cat([t.reshape(-1) for t in b])
        w_flat = torch.cat([p.detach().reshape(-1) for p in ps])
        orth = (a_flat * w_flat).sum().abs() / (a_flat.norm() * w_flat.norm() + 1e-300)
        homog = (c * b_flat - a_flat).norm() / (a_flat.norm() + 1e-300)
        out[tuple(group)] = float(max(orth, homog))
    return out
