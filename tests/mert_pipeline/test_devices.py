"""Devices and threads: what `--device auto` means, torch threads per worker, worker counts, GPU resources."""

from __future__ import annotations

import pytest
import torch

from mert_pipeline.devices import (
    check_device,
    model_workers,
    resolve_device,
    set_threads,
    threads_per_worker,
    with_gpu,
)
from mert_pipeline.executor import Resources


def test_set_threads_and_device() -> None:
    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        set_threads(0)  # 0: leave torch's setting
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError):
        set_threads(-1)
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="--device must be auto, cpu or cuda"):
        check_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU defaults")
def test_cpu_defaults_one_model_worker_with_every_core() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    assert model_workers("auto") == 1 and model_workers("cpu") == 1
    assert threads_per_worker(1) >= 1 and threads_per_worker(10**6) == 1
    assert with_gpu(Resources(model=True), "auto") == Resources(model=True)
