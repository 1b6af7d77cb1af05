"""Training-stack switches: how a framework trains, applied by the harness to every arm of a case
alike, never declared by the case (like the device or the optimizer). `--stack compile,bf16,accumulate=4`.

  compile        torch.compile of each arm's model (nn.Module.compile, in place: state dicts keep
                 their keys, so checkpoints and measurements see the same parameters)
  compile_step   torch.compile of the optimizer's step() (the learning rate stays a Python float the
                 harness sets every step: a schedule that changes it recompiles, see docs/stack.md)
  bf16           autocast to bfloat16 for the forward pass and the loss; float32 master weights
  fp16           autocast to float16 with a gradient scaler; CUDA only
  channels_last  channels-last memory format for the model and every 4-D input (CNNs only)
  accumulate=k   each update uses the mean gradient of k micro-batches: the batch split in k equal
                 parts, each loss a mean over its part, divided by k before backward

The stack's label ('plain', or the switches joined by '+' in the order above) is recorded in
metadata.json, in each verdict row's provenance and in the baseline: a baseline made under one
stack is never compared as if it had been made under another.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

ORDER = ("compile", "compile_step", "bf16", "fp16", "channels_last", "accumulate")
PLAIN = "plain"


class StackError(ValueError):
    """A malformed --stack value (bad input: exit 2)."""


@dataclass(frozen=True)
class Stack:
    compile: bool = False
    compile_step: bool = False
    bf16: bool = False
    fp16: bool = False
    channels_last: bool = False
    accumulate: int = 1

    @property
    def plain(self) -> bool:
        return self == Stack()

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else None

    @property
    def label(self) -> str:
        parts = [name for name in ORDER[:-1] if getattr(self, name)]
        parts += [f"accumulate={self.accumulate}"] if self.accumulate != 1 else []
        return "+".join(parts) or PLAIN

    def __str__(self) -> str:
        return self.label

    def autocast(self, device: torch.device):
        """The forward pass's context: autocast to the stack's low precision, or nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)


def parse(text: str | None) -> Stack:
    """'compile,bf16,accumulate=4' (or '+'-separated, as in labels and matrix cell ids); '' or
    'plain': no switch."""
    if text is None or text.strip() in ("", PLAIN):
        return Stack()
    fields: dict = {}
    for raw in text.replace("+", ",").split(","):
        item = raw.strip()
        if not item:
            continue
        name, _, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if name not in ORDER:
            raise StackError(f"--stack: unknown switch {item!r}; choose from "
                             f"{', '.join(ORDER[:-1])}, accumulate=K")
        if name in fields:
            raise StackError(f"--stack: switch {name!r} given twice in {text!r}")
        if name == "accumulate":
            try:
                k = int(value)
            except ValueError:
                raise StackError(f"--stack: accumulate needs a positive integer, e.g. accumulate=4, "
                                 f"got {item!r}") from None
            if k < 1:
                raise StackError(f"--stack: accumulate needs a positive integer, got {item!r}")
            fields[name] = k
        elif value:
            raise StackError(f"--stack: switch {name!r} takes no value, got {item!r}")
        else:
            fields[name] = True
    if fields.get("bf16") and fields.get("fp16"):
        raise StackError("--stack: bf16 and fp16 exclude each other (one autocast dtype)")
    return Stack(**fields)


@functools.cache
def compiler_problem() -> str | None:
    """Why torch.compile cannot run here (no C++ toolchain, unsupported Python), or None. Tried once
    per process on a two-line function, so a missing toolchain skips every compile case with the
    reason instead of failing each one."""
    try:
        fn = torch.compile(lambda t: torch.relu(t) * 2.0)
        fn(torch.ones(4))
    except Exception as exc:  # whatever the backend raises: the reason is its first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"torch.compile does not work on this machine ({type(exc).__name__}: {first[:160]})"
    return None


def fresh_compiler() -> None:
    """Before each case under compile: forget the graphs of earlier cases and fail loudly where
    dynamo would fall back to eager. Measured without this: in one process running the CPU profile,
    NormMLP.forward hit dynamo's recompile limit (8: grad mode, train/eval, dtypes, shapes across
    cases) after 14 cases, and every later MLP case silently ran eager. Reset per case, a case
    compiles its own few graphs (the on-disk inductor cache keeps that cheap); a case that still
    needs more than the limit ends in error instead of passing uncompiled."""
    import torch._dynamo
    torch._dynamo.reset()
    torch._dynamo.config.fail_on_recompile_limit_hit = True


def unsupported_reason(stack: Stack, model: torch.nn.Module, device: torch.device, sample: torch.Tensor,
                       dtype: torch.dtype) -> str | None:
    """Why this stack cannot apply to a case (the case is skipped with this reason), or None."""
    if stack.fp16 and device.type != "cuda":
        return "stack fp16 needs CUDA (float16 autocast with a gradient scaler); use bf16 on the CPU"
    if stack.autocast_dtype is not None and dtype != torch.float32:
        return (f"stack {stack.label} autocasts from float32 master weights; this case runs in "
                f"{str(dtype).removeprefix('torch.')} (pass --dtype float32)")
    if stack.channels_last and sample.dim() != 4:
        return (f"stack channels_last applies to CNNs: this case's inputs are {sample.dim()}-D, "
                f"not (N, C, H, W)")
    if (stack.compile or stack.compile_step) and compiler_problem():
        return compiler_problem()
    return None


def to_memory_format(stack: Stack, x: torch.Tensor) -> torch.Tensor:
    if stack.channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x
