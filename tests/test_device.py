"""Device decisions made on any machine: compile or not, which GPU each worker gets, what a worker
that runs out of its share of GPU memory is told. The CUDA branches' logic runs here on CPU;
tests/test_gpu.py runs them on a real GPU (``-m gpu``, bench/gpu_check.sh)."""

import pytest
import torch

from charlm.device import GPU_WORKERS, compile_for, compile_mode_for, explain, guard_memory, visible_gpus, worker_env


def test_compile_auto_means_cuda_runs_long_enough_to_repay_it():
    assert compile_for("auto", "cuda", 5000, 0) and compile_for("auto", "cuda", 10**6, 3.0)
    assert not compile_for("auto", "cpu", 5000, 0)
    assert not compile_for("auto", "cuda", 60, 0)  # a test's few steps: the compile would be most of the run
    assert not compile_for("auto", "cuda", 10**6, 0.5)  # a 30-second clock
    assert compile_for("true", "cpu", 60, 0.1) and not compile_for("false", "cuda", 5000, 0)


def test_compile_mode_auto_replays_cuda_graphs_on_cuda_only():
    """CPU has no CUDA graphs; on CUDA a small model's step is launch-bound (bench/gpu_speed.py)."""
    assert compile_mode_for("auto", "cuda") == "reduce-overhead" and compile_mode_for("auto", "cpu") == "default"
    assert compile_mode_for("default", "cuda") == "default" and compile_mode_for("reduce-overhead", "cpu") == "reduce-overhead"


def test_workers_share_the_visible_gpus_round_robin():
    envs = [worker_env(i, 5, ["0", "1"]) for i in range(5)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "0", "1", "0"]
    assert [e[GPU_WORKERS] for e in envs] == ["3", "2", "3", "2", "3"]  # workers on that GPU
    assert worker_env(1, 2, ["GPU-9f", "GPU-3a", "GPU-77"]) == {"CUDA_VISIBLE_DEVICES": "GPU-3a", GPU_WORKERS: "1"}
    assert worker_env(0, 4, []) == {}  # no GPU: the environment stays as it is


@pytest.mark.parametrize("listed,gpus", [("0,1", ["0", "1"]), ("GPU-aa, GPU-bb", ["GPU-aa", "GPU-bb"]),
                                         ("", []), ("-1", [])])
def test_visible_gpus_follow_cuda_visible_devices(monkeypatch, listed, gpus):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
    assert visible_gpus() == gpus


def test_a_worker_out_of_its_share_of_gpu_memory_is_told_what_to_change(monkeypatch):
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setenv(GPU_WORKERS, "4")
    message = explain(oom)
    assert message.startswith("out of GPU memory: this worker may use 22% of a GPU it shares with 3 other worker(s)")
    assert "fewer --workers or a smaller model" in message and "Tried to allocate 2.00 GiB" in message
    assert explain(ValueError("bad")) == "ValueError: bad"
    monkeypatch.setenv(GPU_WORKERS, "1")  # alone on its GPU: torch's own message says it all
    assert explain(oom) == "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert guard_memory("cpu") is None
