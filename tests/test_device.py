"""harness.device: conformance/throughput switches, timing, one GPU per xdist worker, FLOP budgets."""
import os

import pytest
import torch

from harness import device as dv


@pytest.fixture
def restore_settings(monkeypatch):
    """conformance_mode / throughput_mode change process-wide switches: put them back."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "recorded")  # so teardown restores the original state
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    yield
    (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32,
     torch.backends.cuda.matmul.allow_tf32) = saved[:4]
    torch.use_deterministic_algorithms(saved[4], warn_only=saved[5])


@pytest.mark.parametrize("worker, n_gpus, expected", [
    ("gw0", 4, "0"), ("gw3", 4, "3"), ("gw5", 4, "1"), ("gw7", 8, "7"), ("gw12", 8, "4"),
    ("gw2", 1, "0"), ("gw1", 0, None), ("main", 4, None), (None, 4, None), ("gwx", 4, None),
])
def test_visible_device_for_worker(worker, n_gpus, expected):
    assert dv.visible_device_for_worker(worker, n_gpus) == expected


def test_pin_worker_gpu_respects_the_user():
    env = {}
    assert dv.pin_worker_gpu("gw5", 4, env) == "1" and env == {"CUDA_VISIBLE_DEVICES": "1"}
    env = {"CUDA_VISIBLE_DEVICES": "2,3"}  # set by the user: left alone
    assert dv.pin_worker_gpu("gw5", 4, env) is None and env == {"CUDA_VISIBLE_DEVICES": "2,3"}
    env = {}
    assert dv.pin_worker_gpu("gw5", 0, env) is None and env == {}  # no GPU: nothing to pin


@pytest.mark.parametrize("n_gpus, markexpr, device, expected", [
    (4, "gpu", None, 4),
    (4, "gpu and not slow", "cuda", 4),
    (4, "(gpu or cpu)", None, 4),
    (4, "not gpu and not slow", None, None),  # the CPU profile (pyproject's default -m)
    (4, "gpu", "cpu", None),                  # the dry run on the CPU
    (0, "gpu", None, None),                   # no GPU: xdist's default
    (2, "", None, None),
])
def test_auto_workers(n_gpus, markexpr, device, expected):
    assert dv.auto_workers(n_gpus, markexpr, device) == expected


def test_gpu_count_matches_torch():
    assert dv.gpu_count() == (torch.cuda.device_count() if torch.backends.cuda.is_built() else 0)


def test_conformance_mode(restore_settings):
    on_cpu = dv.conformance_mode("cpu")  # changes nothing on the CPU
    assert on_cpu == dv.determinism_settings()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    settings = dv.conformance_mode("cuda")  # the switches need no GPU to be set
    assert settings["cudnn.benchmark"] is False and settings["cudnn.deterministic"] is True
    assert settings["cudnn.allow_tf32"] is False and settings["cuda.matmul.allow_tf32"] is False
    assert settings["deterministic_algorithms"] and settings["deterministic_warn_only"]
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert dv.conformance_mode("cuda", tf32=True)["cudnn.allow_tf32"] is True


def test_throughput_mode_on_cpu(restore_settings):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    tp = dv.throughput_mode(model, channels_last=True, bf16_autocast=True)
    x = tp.prepare(torch.randn(2, 3, 8, 8))
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    with tp.autocast():
        out = tp.model(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 2)
    plain = dv.throughput_mode(model, channels_last=False, bf16_autocast=False)
    with plain.autocast():
        assert plain.model(torch.randn(2, 3, 8, 8)).dtype == torch.float32


def test_timed_returns_result_and_seconds():
    result, seconds = dv.timed(lambda: sum(range(1000)), "cpu")
    assert result == 499500 and 0 <= seconds < 5
    dv.synchronize("cpu")  # a no-op, but callable


@pytest.mark.skipif(not torch.cuda.is_available(), reason="requires CUDA")
def test_timed_on_cuda():
    x = torch.randn(1024, 1024, device="cuda")
    _, seconds = dv.timed(lambda: x @ x, "cuda")
    assert seconds > 0


def test_flop_table_is_the_counted_one():
    for name in ("preresnet32", "wrn16_4", "resnet18_cifar"):
        assert dv.forward_flops(name) == dv.FORWARD_FLOPS[name], name


def test_estimated_minutes():
    flops = dv.FORWARD_FLOPS["resnet18_cifar"]
    minutes = dv.estimated_minutes("resnet18_cifar", 50_000, 30, 2)
    assert minutes == pytest.approx(2 * 30 * 3 * flops * 50_000 / 100e12 / 60)
    assert 1.5 < minutes < 2.0  # 1.67 min at 100 TFLOP/s
    assert dv.estimated_minutes("resnet18_cifar", 50_000, 30, 2, tflops=50) == pytest.approx(2 * minutes)
    with pytest.raises(ValueError, match="no FLOP count"):
        dv.estimated_minutes("nope", 1, 1, 1)


def test_case_estimates_of_the_gpu_cases():
    from harness import registry
    cases = registry.all_cases()
    for cid in ("wdexp-gpu-resnet18-cifar10", "texppp-gpu-resnet18-cifar10"):
        e = dv.case_estimate(cases[cid])
        assert e["arms"] == 2 and e["images_per_epoch"] == 50_000 and 29.9 < e["epochs"] <= 30
        assert 1.5 < e["minutes_tf32"] < 2.0 and 5 < e["minutes_fp32"] < 7
