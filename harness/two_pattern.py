"""The two-pattern toy of Li, Wei & Ma (NeurIPS 2019, arXiv 1907.04595), CLAIMS.md §6: a data
source, a two-layer ReLU net and the linear-rule baseline on the memorizable pattern (its check,
`difference_above`, is in harness.checks).

Distribution (our reconstruction). y = ±1 (labels 1/0 for the cross-entropy on logits [0, f(x)]);
x = scale·(x1, x2) ∈ R^{2d}. Example types, in exact proportions per set: `frac_x1` only x1 (x2 = 0),
`frac_x2` only x2 (x1 = 0), the rest both.
- x1, generalizing and linear: s·(y·c/√d·w* + g⊥), g⊥ ~ N(0, I/d) projected off the unit vector w*.
  Linearly separable along w* with margin s·c/√d, but buried in d − 1 noise directions.
- x2, memorizable and not linearly separable: α·z for y = +1, α·(z ± ζ) for y = −1 (random sign),
  ‖z‖ = 1, ζ ⊥ z, ‖ζ‖ = d^{-1/4}, α ~ U[0, 1]. The positive segment lies in the convex hull of the two
  negative ones, so no linear rule separates them; a rule with a bias along ζ gets 3/4 right.
w*, z and ζ are drawn once per source (per seed), shared by the training set and every eval set.

Negative-control variants: `memorizable=False` sets x2 ≡ 0 (the x2-only examples are then blank
inputs with random labels; every x1 is drawn exactly as with the pattern), and `x2_separable=True`
puts the negatives at α·(−z ± ζ), separable by z through the origin.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from harness.datasets import TensorSource

BOTH, X1_ONLY, X2_ONLY = 0, 1, 2
TYPE_NAMES = {BOTH: "both", X1_ONLY: "x1_only", X2_ONLY: "x2_only"}


class TwoPatternSource(TensorSource):
    """A TensorSource that also knows the pattern type of each training example and the
    distribution's fixed vectors (for the linear baseline and the tests)."""

    def __init__(self, *args, train_types: torch.Tensor, d: int, vectors: dict[str, torch.Tensor],
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.train_types, self.d, self.vectors = train_types, d, vectors


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def draw_vectors(d: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """w* and z unit vectors, ζ ⊥ z with ‖ζ‖ = d^{-1/4} (float64, on the data stream)."""
    w_star = _unit(torch.randn(d, generator=gen, dtype=torch.float64))
    z = _unit(torch.randn(d, generator=gen, dtype=torch.float64))
    zeta = torch.randn(d, generator=gen, dtype=torch.float64)
    zeta = _unit(zeta - (zeta @ z) * z) * d ** -0.25
    return {"w_star": w_star, "z": z, "zeta": zeta}


def exact_types(n: int, frac_x1: float, frac_x2: float, gen: torch.Generator) -> torch.Tensor:
    """round(frac·n) examples of each single-pattern type, the rest both, in random order."""
    n1, n2 = round(frac_x1 * n), round(frac_x2 * n)
    if n1 + n2 > n:
        raise ValueError(f"frac_x1 + frac_x2 must be <= 1, got {frac_x1} + {frac_x2}")
    types = torch.full((n,), BOTH, dtype=torch.long)
    types[:n1], types[n1:n1 + n2] = X1_ONLY, X2_ONLY
    return types[torch.randperm(n, generator=gen)]


def sample(types: torch.Tensor, vectors: dict[str, torch.Tensor], gen: torch.Generator, *, c: float,
           s: float, scale: float, memorizable: bool = True,
           x2_separable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples of the given types: x (n × 2d, float64) and y ∈ {−1, +1} (float64)."""
    n, d = len(types), len(vectors["z"])
    w_star, z, zeta = vectors["w_star"], vectors["z"], vectors["zeta"]
    y = torch.where(torch.rand(n, generator=gen) < 0.5, 1.0, -1.0).to(torch.float64)
    g = torch.randn(n, d, generator=gen, dtype=torch.float64) / math.sqrt(d)
    g_perp = g - (g @ w_star)[:, None] * w_star
    x1 = s * (y[:, None] * (c / math.sqrt(d)) * w_star + g_perp)
    alpha = torch.rand(n, generator=gen, dtype=torch.float64)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, 1.0, -1.0).to(torch.float64)
    neg = (y < 0).to(torch.float64)
    base = torch.where(y[:, None] < 0, -z, z) if x2_separable else z.expand(n, d)
    x2 = alpha[:, None] * (base + (neg * sign)[:, None] * zeta)
    if not memorizable:
        x2 = torch.zeros_like(x2)
    x1 = torch.where((types == X2_ONLY)[:, None], 0.0, x1)
    x2 = torch.where((types == X1_ONLY)[:, None], 0.0, x2)
    return scale * torch.cat([x1, x2], dim=1), y


def two_pattern(*, gen: torch.Generator, aug_gen: torch.Generator, dtype: torch.dtype,
                device: torch.device, smoke: bool, d: int = 500, n_train: int = 1000,
                n_test: int = 2000, frac_x1: float = 0.2, frac_x2: float = 0.2, c: float = 0.75,
                s: float = 0.05, scale: float = 20.0, batch_size: int = 16, memorizable: bool = True,
                x2_separable: bool = False) -> TwoPatternSource:
    """The training set (n_train, mixed types), a mixed test split of n_test, and eval sets of
    n_test examples each: 'x1_only', 'x2_only' and 'both'. Everything from the data stream `gen`.
    The defaults are the constants measured in cases/learning_order_toy.py (c, s are not in CLAIMS):
    with s = 0.05 and scale = 20 the x1 block has norm ≈ 1 and the x2 block up to 20."""
    if smoke:
        n_train, n_test = min(n_train, 8 * batch_size), min(n_test, 64)
    vectors = draw_vectors(d, gen)
    opts = dict(c=c, s=s, scale=scale, memorizable=memorizable, x2_separable=x2_separable)
    train_types = exact_types(n_train, frac_x1, frac_x2, gen)
    train_x, train_y = sample(train_types, vectors, gen, **opts)
    test_x, test_y = sample(exact_types(n_test, frac_x1, frac_x2, gen), vectors, gen, **opts)
    eval_sets = {}
    for kind in (X1_ONLY, X2_ONLY, BOTH):
        ex, ey = sample(torch.full((n_test,), kind, dtype=torch.long), vectors, gen, **opts)
        eval_sets[TYPE_NAMES[kind]] = (ex, ey)

    def put(x, y):  # labels y = ±1 -> classes 1/0 (logit f > 0 <=> y = +1)
        return x.to(device, dtype), (y > 0).long().to(device)

    test_x, test_y = put(test_x, test_y)
    return TwoPatternSource(*put(train_x, train_y), batch_size=batch_size, gen=gen, test_x=test_x,
                            test_y=test_y, eval_sets={k: put(*v) for k, v in eval_sets.items()},
                            train_types=train_types.to(device), d=d, vectors=vectors)


class TwoLayerReLU(nn.Module):
    """f(x) = a·ReLU(Wx + b) (+ a bias), logits [0, f(x)]: the cross-entropy is the logistic loss
    softplus(−y f) for y = ±1. No scale-invariant weights (si_names = ())."""

    def __init__(self, in_dim: int = 1000, width: int = 200, bias: bool = True):
        super().__init__()
        self.hidden = nn.Linear(in_dim, width, bias=bias)
        self.out = nn.Linear(width, 1, bias=bias)
        self.si_names: tuple[str, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.out(torch.relu(self.hidden(x)))
        return torch.cat([torch.zeros_like(f), f], dim=1)


# ---- linear rules on the x2-only examples -----------------------------------------------------------

def best_linear_rule(x: torch.Tensor, y: torch.Tensor, *, angles: int = 1440,
                     rank_tol: float | None = None) -> tuple[torch.Tensor, float]:
    """The linear rule sign(⟨u, x⟩ − t) with the most training examples right (y ∈ {0, 1}), for data
    spanning at most 2 dimensions: exhaustive over every threshold and over `angles` directions of the
    span (0.25° apart by default). Returns (u, t) with u in the input space. The span's dimension is
    the number of singular values above `rank_tol` (default 1e3·eps of x's dtype) × the largest."""
    if rank_tol is None:
        rank_tol = 1e3 * torch.finfo(x.dtype).eps
    x = x.double()
    _, sv, vt = torch.linalg.svd(x, full_matrices=False)
    r = int((sv > rank_tol * sv[0]).sum())
    if r > 2:
        raise ValueError(f"best_linear_rule searches a span of at most 2 dimensions, the data span {r}")
    basis = vt[:max(r, 1)]  # r × D
    p = x @ basis.T  # n × r
    if r < 2:
        p = torch.cat([p, torch.zeros_like(p)], dim=1)
        basis = torch.cat([basis, torch.zeros_like(basis)])
    theta = torch.arange(angles, dtype=torch.float64) * (2 * math.pi / angles)
    dirs = torch.stack([theta.cos(), theta.sin()], dim=1)  # A × 2
    proj = p @ dirs.T  # n × A
    order = proj.argsort(dim=0)
    ys = y.double()[order]  # n × A, labels sorted by projection
    n = len(y)
    # Predict 1 above the threshold: threshold below the k smallest (k = 0..n): right = zeros among the
    # k smallest + ones among the rest.
    zeros_below = torch.cat([torch.zeros(1, angles, dtype=torch.float64), (1 - ys).cumsum(0)])
    ones_above = ys.sum(0) - torch.cat([torch.zeros(1, angles, dtype=torch.float64), ys.cumsum(0)])
    right = zeros_below + ones_above  # (n + 1) × A
    k, a = divmod(int(right.argmax()), angles)
    sp = proj[:, a].gather(0, order[:, a])
    lo = sp[k - 1] if k > 0 else sp[0] - 1.0
    hi = sp[k] if k < n else sp[-1] + 1.0
    return dirs[a] @ basis, float((lo + hi) / 2)


def logistic_regression(x: torch.Tensor, y: torch.Tensor, *, iters: int = 200) -> tuple[torch.Tensor, float]:
    """Plain (unregularized) logistic regression with a bias, fitted by L-BFGS in float64."""
    x, t = x.double(), 2 * y.double() - 1
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.softplus(-t * (x @ w + b)).mean()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), float(b.detach())


def rule_accuracy(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: float) -> float:
    return float((((x.double() @ w) - b > 0).long() == y.long()).double().mean())


def linear_baseline(ctx) -> list[tuple[str, str, float]]:
    """On the x2-only training examples (their x2 block): the best linear rule with a bias and plain
    logistic regression, and their accuracies on the 'x2_only' eval set. Arm-independent, so reported
    once, under the reference arm: metrics 'linear_acc_x2_only' and 'logreg_acc_x2_only' (plus the
    best rule's training accuracy 'linear_train_acc_x2_only'). Run it once (a large `every`)."""
    src = ctx.source
    d = src.d
    keep = (src.train_types == X2_ONLY).to(src.train_x.device)
    xtr, ytr = src.train_x[keep][:, d:].cpu(), src.train_y[keep].cpu()
    xte, yte = (t.cpu() for t in src.eval_sets["x2_only"])
    xte = xte[:, d:].double()
    u, t = best_linear_rule(xtr, ytr)
    w, b = logistic_regression(xtr, ytr)
    return [(ctx.reference, "linear_train_acc_x2_only", rule_accuracy(xtr, ytr, u, t)),
            (ctx.reference, "linear_acc_x2_only", rule_accuracy(xte, yte, u, t)),
            (ctx.reference, "logreg_acc_x2_only", rule_accuracy(xte, yte, w, -b))]
