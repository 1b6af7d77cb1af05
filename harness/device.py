"""Device policy: how a run uses its accelerator.

- `conformance_mode(device)`: what every conformance run on CUDA uses (deterministic kernels, no
  autotuning, no TF32 unless asked); the runner calls it for every CUDA run.
- `throughput_mode(model, ...)`: channels-last, bf16 autocast, torch.compile, cuDNN autotuning and
  TF32. For benchmarks and throughput runs only: never for a run whose verdicts count.
- `synchronize(device)` / `timed(fn, device)`: wall time of GPU work (CUDA events on CUDA,
  perf_counter elsewhere), synchronized before and after.
- One GPU per pytest-xdist worker: `visible_device_for_worker`, `pin_worker_gpu`, `auto_workers`
  (used by conftest.py), and `gpu_count()` for the xdist controller.
- Budgets: `estimated_minutes(model, images_per_epoch, epochs, arms)` from forward FLOPs per image
  (`FORWARD_FLOPS`, counted with torch.utils.flop_counter) and an assumed sustained throughput.
  `python -m harness.device` prints the estimate of every GPU-profile case.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch
from torch import nn

CUBLAS_WORKSPACE_CONFIG = ":4096:8"


# ---- conformance and throughput ------------------------------------------------------------------

def determinism_settings() -> dict[str, Any]:
    """The switches conformance_mode sets, as they are now (for metadata and tests)."""
    return {
        "cudnn.benchmark": torch.backends.cudnn.benchmark,
        "cudnn.deterministic": torch.backends.cudnn.deterministic,
        "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
        "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }


def conformance_mode(device: str | torch.device, *, tf32: bool = False) -> dict[str, Any]:
    """Make CUDA runs deterministic and exact to their dtype; returns determinism_settings().

    On CUDA: cudnn.benchmark off (autotuning picks kernels by timing, so the choice, and the
    roundoff, can change between runs), cudnn.deterministic on,
    torch.use_deterministic_algorithms(True, warn_only=True) (an op without a deterministic kernel
    warns instead of failing), CUBLAS_WORKSPACE_CONFIG=:4096:8 (deterministic cuBLAS; it is read
    when cuBLAS creates its handle, so call this before the first CUDA matmul: a warning says so
    when CUDA is already initialized and the variable was unset), and TF32 off for convolutions and
    matmuls unless `tf32=True`: torch's default lets cuDNN convolutions run in TF32 (10-bit mantissa),
    which a float32 case does not declare. On the CPU it changes nothing (CPU kernels are
    deterministic for a fixed thread count, and deterministic mode would make torch.empty fill
    memory with NaN, slowing every CPU run).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
            if torch.cuda.is_initialized():
                warnings.warn("conformance_mode: CUDA was initialized before CUBLAS_WORKSPACE_CONFIG was set; "
                              "cuBLAS handles created before now are not deterministic", RuntimeWarning,
                              stacklevel=2)
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE_CONFIG
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.use_deterministic_algorithms(True, warn_only=True)
    return determinism_settings()


@dataclass
class Throughput:
    """What throughput_mode returns: the model to call, a context manager for its forward/backward
    (bf16 autocast, or a no-op), `prepare(x)` for inputs (channels-last), and the switches set."""

    model: nn.Module
    autocast: Callable[[], ContextManager]
    prepare: Callable[[torch.Tensor], torch.Tensor]
    settings: dict[str, Any] = field(default_factory=dict)


def throughput_mode(model: nn.Module, *, channels_last: bool = True, bf16_autocast: bool = True,
                    compile: bool = False) -> Throughput:
    """Switches for throughput runs ONLY (benchmarks, budget measurements), never for conformance:
    they trade exactness and run-to-run determinism for speed. Turns cuDNN autotuning and TF32 on
    and deterministic algorithms off (process-wide; conformance_mode turns them back), converts the
    model (in place) and its inputs to channels-last, runs forward/backward under bf16 autocast, and
    wraps the model in torch.compile when asked. On the CPU only channels-last, autocast (bf16 on
    CPU) and compile apply."""
    param = next(model.parameters(), None)
    dev = param.device if param is not None else torch.device("cpu")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.use_deterministic_algorithms(False)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    run_model = torch.compile(model) if compile else model

    def autocast() -> ContextManager:
        if not bf16_autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=fmt) if x.dim() == 4 else x

    settings = determinism_settings()
    settings.update(channels_last=channels_last, bf16_autocast=bf16_autocast, compile=compile)
    return Throughput(run_model, autocast, prepare, settings)


def synchronize(device: str | torch.device | None = None) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()


def timed(fn: Callable[[], Any], device: str | torch.device | None = None) -> tuple[Any, float]:
    """(fn(), seconds). Synchronizes before, so earlier queued work is not billed to fn, and after,
    so fn's own asynchronous work is. On CUDA the time is taken between two CUDA events on the
    current stream (GPU time, immune to host jitter); elsewhere with time.perf_counter."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    synchronize(dev)
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        return result, start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    result = fn()
    synchronize(dev)
    return result, time.perf_counter() - t0


# ---- one GPU per pytest-xdist worker -------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def gpu_count() -> int:
    """GPUs visible to this process (honours CUDA_VISIBLE_DEVICES); 0 without a CUDA build or driver.

    Called in the pytest-xdist controller only: it runs no test, so querying the driver there
    (cudaGetDeviceCount; no context is created) costs the workers nothing. The workers learn the
    count from the controller and pin their GPU before they touch CUDA."""
    if not torch.backends.cuda.is_built():
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA initialization: no NVIDIA driver" on CPU machines
        try:
            return int(torch.cuda.device_count())
        except Exception:
            return 0


def visible_device_for_worker(worker_id: str | None, n_gpus: int) -> str | None:
    """The CUDA_VISIBLE_DEVICES value for pytest-xdist worker `worker_id` ("gw3" -> GPU 3 modulo
    n_gpus); None when there is no GPU or the id is not an xdist worker id."""
    m = re.fullmatch(r"gw(\d+)", worker_id or "")
    if not m or n_gpus <= 0:
        return None
    return str(int(m.group(1)) % n_gpus)


def pin_worker_gpu(worker_id: str | None, n_gpus: int, environ: dict | None = None) -> str | None:
    """Set CUDA_VISIBLE_DEVICES for this worker (before CUDA starts: it is read once, at CUDA
    initialization) unless the user set it: their choice wins. Returns the value set, or None."""
    env = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in env:
        return None
    value = visible_device_for_worker(worker_id, n_gpus)
    if value is not None:
        env["CUDA_VISIBLE_DEVICES"] = value
    return value


def selects_gpu_tests(markexpr: str | None) -> bool:
    """Whether a -m expression selects the gpu marker (a `gpu` not preceded by `not`)."""
    tokens = re.findall(r"[\w.-]+|[()]", markexpr or "")
    return any(tok == "gpu" and (i == 0 or tokens[i - 1] != "not") for i, tok in enumerate(tokens))


def auto_workers(n_gpus: int, markexpr: str | None, device: str | None) -> int | None:
    """`pytest -n auto`: one worker per GPU for a run of the GPU profile on CUDA (-m gpu, --device
    unset or cuda); None (xdist's default, one per CPU) otherwise: without GPUs, for the CPU profile,
    and for the dry run with --device cpu."""
    if n_gpus <= 0 or not selects_gpu_tests(markexpr):
        return None
    if device is not None and not device.startswith("cuda"):
        return None
    return n_gpus


# ---- budgets ---------------------------------------------------------------------------------------

# Forward FLOPs per 3×32×32 image at batch 1, counted by torch.utils.flop_counter.FlopCounterMode on
# the CPU (convolutions and the classifier matmul, 2 FLOPs per multiply-add; normalization, ReLU and
# residual adds are memory-bound and not counted). tests/test_device.py recounts them.
FORWARD_FLOPS: dict[str, int] = {
    "resnet18_cifar": 1_110_845_440,
    "preresnet32": 138_249_472,
    "wrn16_4": 785_224_704,
    "wrn16_10": 4_824_347_136,
}
# Backward ≈ 2 × forward (gradients w.r.t. activations and weights), so a training image costs 3×.
TRAIN_FACTOR = 3
# Assumed sustained throughput on one H100-class GPU: TF32/bf16 tensor cores at realistic
# utilization for small-image ResNets at batch 128 (≈ 20% of the 495 TFLOP/s dense TF32 peak of an
# H100 SXM). Conformance float32 without TF32 (conformance_mode's default) runs on the FP32 units:
# 67 TFLOP/s peak, about 30 sustained, so multiply those estimates by ≈ 3.3.
SUSTAINED_TFLOPS = 100.0
STRICT_FP32_TFLOPS = 30.0


def forward_flops(model_name: str, kwargs: dict | None = None, image: tuple[int, ...] = (3, 32, 32)) -> int:
    """Forward FLOPs of one image through a registered model (FlopCounterMode, batch 1, eval mode)."""
    from torch.utils.flop_counter import FlopCounterMode

    from harness.models import build_model
    model = build_model(model_name, dict(kwargs or {}), generator_seed=0, dtype=torch.float32,
                        device=torch.device("cpu")).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *image))
    return int(counter.get_total_flops())


def estimated_minutes(model_name: str, images_per_epoch: int, epochs: float, arms: int, *,
                      eval_images_per_epoch: int = 0, tflops: float = SUSTAINED_TFLOPS) -> float:
    """Minutes on one H100-class GPU: arms × epochs × (3 × forward FLOPs × training images
    + forward FLOPs × evaluated images) / sustained FLOP/s. A lower bound in spirit: data
    movement, measurements other than the evaluation and Python overhead are not counted."""
    if model_name not in FORWARD_FLOPS:
        raise ValueError(f"no FLOP count for model {model_name!r}; known: {sorted(FORWARD_FLOPS)} "
                         f"(count one with harness.device.forward_flops)")
    per_arm = epochs * FORWARD_FLOPS[model_name] * (TRAIN_FACTOR * images_per_epoch + eval_images_per_epoch)
    return arms * per_arm / (tflops * 1e12) / 60.0


def case_estimate(case) -> dict[str, Any]:
    """The budget of a registered case from its declaration: the training images per arm (steps ×
    batch size, or the epochs of an epoch-unit case), plus one pass over the test split per
    'test_acc' measurement (10,000 CIFAR-10 images) and over the named eval sets per 'eval_acc'."""
    data = dict(case.data[1])
    batch = int(data.get("batch_size", 128))
    per_class = data.get("per_class")
    images_per_epoch = 10 * per_class if per_class else 50_000
    epochs = case.steps if case.unit == "epoch" else case.steps * batch / images_per_epoch
    test_images = 10 * data["test_per_class"] if data.get("test_per_class") else 10_000
    per_eval = {"test_acc": test_images,
                "eval_acc": (test_images + dict(data.get("patch") or {}).get("eval_patch_only", 1000)
                             if data.get("patch") is not None else 0)}
    eval_images = 0
    for m in case.measurements:
        name, kw = (m, {}) if isinstance(m, str) else m
        if name in per_eval:
            evals = case.steps if case.unit == "epoch" else -(-case.steps // int(kw.get("every", 1)))
            eval_images += evals * per_eval[name]
    eval_per_epoch = eval_images / epochs if epochs else 0
    model = case.model[0]
    args = dict(images_per_epoch=images_per_epoch, epochs=epochs, arms=len(case.arms),
                eval_images_per_epoch=round(eval_per_epoch))
    return {"case": case.id, "model": model, **args,
            "minutes_tf32": estimated_minutes(model, **args),
            "minutes_fp32": estimated_minutes(model, **args, tflops=STRICT_FP32_TFLOPS)}


def main() -> int:
    from harness import registry
    print(f"# minutes on one H100-class GPU: {SUSTAINED_TFLOPS:g} TFLOP/s sustained (TF32), "
          f"{STRICT_FP32_TFLOPS:g} (strict float32)")
    for name, flops in FORWARD_FLOPS.items():
        print(f"# {name}: {flops / 1e9:.3f} GFLOP forward per 32×32 image, ×{TRAIN_FACTOR} to train")
    print("case\tmodel\timages/epoch\tepochs\tarms\ttest images/epoch\tmin (TF32)\tmin (fp32)")
    for case in registry.all_cases().values():
        if case.profile != "gpu" or case.model[0] not in FORWARD_FLOPS:
            continue
        e = case_estimate(case)
        print(f"{e['case']}\t{e['model']}\t{e['images_per_epoch']}\t{e['epochs']:.2f}\t{e['arms']}\t"
              f"{e['eval_images_per_epoch']}\t{e['minutes_tf32']:.1f}\t{e['minutes_fp32']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
