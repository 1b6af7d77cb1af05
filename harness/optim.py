"""The system under test: optimizer factories with torch.optim.SGD's signature.

A factory is called as `Factory(param_groups, lr=…, momentum=…, weight_decay=…, **user_kwargs)`;
the harness then changes the LR only through `param_groups[i]['lr']`. Each group also carries its
own 'lr', 'momentum' and 'weight_decay', as torch.optim.SGD groups do. `user_kwargs` come from
`--optimizer-kwargs JSON` (e.g. {"foreach": true}). A factory whose signature has no `momentum`
(a pure SGD variant) is called without it and runs only the momentum-free cases.
"""
from __future__ import annotations

import importlib
import inspect
import json
from typing import Any, Callable

import torch

DEFAULT_OPTIMIZER = "torch.optim:SGD"


class OptimizerSpecError(ValueError):
    pass


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ("" when it has none): what one-line reasons show."""
    return (str(exc).strip().splitlines() or [""])[0]


class OptimizerFailed(RuntimeError):
    """The optimizer under test raised. The case ends as an `error` outcome naming the exception's
    type and first line; the run goes on with the other cases. `__cause__` keeps the original."""

    def __init__(self, spec: str, where: str, exc: BaseException):
        first = first_line(exc)
        super().__init__(f"optimizer {spec} raised {type(exc).__name__} in {where}" + (f": {first}" if first else ""))
        self.where = where


def sut_failure(spec: str, where: str, exc: Exception) -> OptimizerFailed:
    """Wrap an exception raised by the system under test (raise it `from exc`)."""
    return exc if isinstance(exc, OptimizerFailed) else OptimizerFailed(spec, where, exc)


def check_constructible(factory: Callable, spec: str, kwargs: dict | None = None) -> None:
    """Construct the optimizer once, on a throw-away parameter, with the keywords the harness passes
    (SGD's) and the user's: a plug-in with another signature is bad input, said once before any case."""
    probe = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    momentum = 0.9 if accepts(factory, "momentum") else 0.0
    groups = [dict(params=[probe], lr=0.1, momentum=momentum, weight_decay=5e-4)]
    try:
        make_optimizer(factory, spec, groups, kwargs)
    except OptimizerFailed as exc:  # the plug-in's own constructor raised: nothing could run
        cause = exc.__cause__
        first = first_line(cause)
        extra = f" and {json.dumps(kwargs)}" if kwargs else ""
        raise OptimizerSpecError(f"optimizer {spec} cannot be constructed with torch.optim.SGD's keywords "
                                 f"(params, lr=, momentum=, weight_decay=){extra}: {type(cause).__name__}: {first}") from cause


def load_factory(spec: str) -> Callable[..., torch.optim.Optimizer]:
    """Resolve 'pkg.module:Name' (a class or a factory function)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise OptimizerSpecError(f"--optimizer must look like 'pkg.module:Name', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # not found, or the plug-in's module raised while importing
        first = first_line(exc)
        raise OptimizerSpecError(f"--optimizer {spec}: cannot import module {module_name!r} "
                                 f"({type(exc).__name__}: {first})") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise OptimizerSpecError(f"--optimizer {spec}: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise OptimizerSpecError(f"--optimizer {spec}: {attr!r} is not callable")
    return obj


HARNESS_KEYWORDS = ("lr", "momentum", "weight_decay")


def parse_kwargs(text: str | None) -> dict:
    """`--optimizer-kwargs` JSON: an object of extra constructor keywords, never the harness's own."""
    if not text:
        return {}
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OptimizerSpecError(f"--optimizer-kwargs must be a JSON object, e.g. '{{\"foreach\": true}}' "
                                 f"({exc.msg} at character {exc.pos})") from None
    if not isinstance(kwargs, dict):
        raise OptimizerSpecError(f"--optimizer-kwargs must be a JSON object, got {type(kwargs).__name__}")
    clash = sorted(set(kwargs) & set(HARNESS_KEYWORDS))
    if clash:
        raise OptimizerSpecError(f"--optimizer-kwargs must not set {', '.join(clash)}: every case sets "
                                 f"lr, momentum and weight_decay itself")
    return kwargs


def accepts(factory: Callable, name: str) -> bool:
    """Whether the factory's signature takes keyword `name` (a class: its __init__); unknown: True."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def make_optimizer(factory: Callable, spec: str, groups: list[dict], kwargs: dict | None = None) -> torch.optim.Optimizer:
    first = groups[0]
    harness_kw = dict(lr=first["lr"], weight_decay=first["weight_decay"])
    if accepts(factory, "momentum"):
        harness_kw["momentum"] = first["momentum"]
    try:
        opt = factory(groups, **harness_kw, **(kwargs or {}))
    except TypeError as exc:
        extra = f" and --optimizer-kwargs {json.dumps(kwargs)}" if kwargs else ""
        raise OptimizerSpecError(
            f"optimizer {spec} must accept (params, lr=, momentum=, weight_decay=) like "
            f"torch.optim.SGD{extra}: {exc}") from exc
    except Exception as exc:
        raise sut_failure(spec, "the constructor", exc) from exc
    if not hasattr(opt, "param_groups") or not hasattr(opt, "step"):
        raise OptimizerSpecError(f"optimizer {spec} returned {type(opt).__name__}, which has no "
                                 f"param_groups/step: it must behave like a torch.optim.Optimizer")
    return opt


def supports_momentum_buffer_state(opt: torch.optim.Optimizer) -> bool:
    """Whether seeding `state[p]['momentum_buffer']` before the first step is honoured."""
    return isinstance(opt, torch.optim.SGD) or getattr(opt, "honours_momentum_buffer_state", False)


def supports_nesterov(opt: torch.optim.Optimizer) -> bool:
    """Whether a param group's 'nesterov': True is honoured (an optimizer that ignored it would
    silently run heavy-ball momentum)."""
    return isinstance(opt, torch.optim.SGD) or getattr(opt, "honours_nesterov", False)


# ---- implementations the harness ships (reference, switches, and a known non-conformer) ----

class _PlainSGD(torch.optim.Optimizer):
    """One tensor at a time, momentum buffer in `state[p]['momentum_buffer']` (so a seeded buffer is
    honoured). Subclasses say where the weight decay goes: `coupled` into the direction d (before
    momentum, Definition 1.2) or decoupled (applied to θ beside the step)."""

    honours_momentum_buffer_state = True
    coupled = True

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, wd, momentum = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad + wd * p if self.coupled else p.grad
                if momentum:
                    buf = self.state[p].get("momentum_buffer")
                    buf = d.clone() if buf is None else buf.mul_(momentum).add_(d)
                    self.state[p]["momentum_buffer"] = buf
                    d = buf
                if not self.coupled:
                    p.mul_(1 - lr * wd)
                p.sub_(lr * d)


class ReferenceSGD(_PlainSGD):
    """Definition 1.2 of Li & Arora written out plainly, one tensor at a time:
    v_t = γ v_{t−1} + g_t + λ θ_{t−1};  θ_t = θ_{t−1} − η v_t;  v_0 = 0 (or a seeded buffer)."""


class SGDW(_PlainSGD):
    """SGD with decoupled weight decay (Loshchilov & Hutter): θ ← θ − η v_t − ηλ θ, with the decay
    kept out of the momentum. Not Definition 1.2, so the WD ≡ exp-LR cases must reject it."""

    coupled = False


def sgd_foreach(params, **kw) -> torch.optim.SGD:
    return torch.optim.SGD(params, foreach=True, **kw)


def sgd_forloop(params, **kw) -> torch.optim.SGD:
    return torch.optim.SGD(params, foreach=False, **kw)


def sgd_fused(params, **kw) -> torch.optim.SGD:
    return torch.optim.SGD(params, fused=True, **kw)
