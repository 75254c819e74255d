"""Where a fit trains, and how a sweep's workers share the GPUs (a machine's GPUs given here)."""

from __future__ import annotations

import os

import pytest
import torch

from project.utils import devices


def test_workers_are_two_per_gpu_each_pinned_round_robin_and_one_per_core_without_gpus():
    assert devices.default_workers(cpus=16, gpus=1) == 2
    assert devices.default_workers(cpus=16, gpus=4) == 8
    assert devices.default_workers(cpus=2, gpus=0) == 2  # the CPU's behaviour, as before
    assert devices.worker_gpus(5, ["0", "1"]) == ["0", "1", "0", "1", "0"]
    assert devices.worker_gpus(2, ["3", "5"]) == ["3", "5"]  # the ids CUDA_VISIBLE_DEVICES named
    assert devices.worker_gpus(2, []) == [None, None]


@pytest.mark.parametrize(
    ("count", "listed", "expected"),
    [(0, None, []), (2, None, ["0", "1"]), (2, "3,5", ["3", "5"]), (1, "3,5", ["3"]), (0, "", [])],
)
def test_visible_gpus_follow_cuda_visible_devices(monkeypatch, count, listed, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    if listed is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
    assert devices.visible_gpus() == expected


def test_a_pinned_worker_sees_its_gpu_alone(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    devices.pin_to("1")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    devices.pin_to(None)  # no GPU: nothing changes
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"


def test_the_training_device_follows_the_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert devices.training_device("auto") == torch.device("cuda", 0)
    assert devices.training_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.training_device("auto") == torch.device("cpu")
    assert devices.describe(torch.device("cpu")) == "cpu"


def test_on_apples_mps_the_scores_accumulate_in_float32(monkeypatch):
    """MPS has no float64: where the fit trains there, the metrics' states and sums are float32."""
    from project.engine.metrics import StackedAccuracy, StackedRMSE

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert StackedRMSE(2).total.dtype == torch.float64
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert devices.training_device("auto") == torch.device("mps")
    assert devices.training_device("cpu") == torch.device("cpu")
    rmse, accuracy = StackedRMSE(2, inverse=torch.expm1), StackedAccuracy(2)
    assert rmse.total.dtype == accuracy.count.dtype == torch.float32
    rmse.update(torch.ones(2, 3), torch.zeros(2, 3), torch.ones(2, 3))
    accuracy.update(torch.randn(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3))
    assert rmse.compute().dtype == accuracy.compute().dtype == torch.float32
    torch.testing.assert_close(rmse.compute(), torch.full((2,), torch.e - 1))
