"""The CUDA branches on a real GPU: compiled training, the loss kept on the device, a mixture's gate
fitted for a model on the GPU, the GPU's random stream in a saved state, the memory guard of
workers sharing a GPU. Run by bench/gpu_check.sh (``pytest -m gpu``) on a GPU machine;
tests/test_device.py, tests/test_train.py and tests/test_models.py test the same logic on CPU."""

import dataclasses
import math
import os
import subprocess

import pytest
import torch

from charlm.tracking import NullTracker
from charlm.trainer import train
from helpers import PYTHON, ROOT

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda_cfg(tiny_cfg):
    assert torch.cuda.is_available(), "the gpu tests need a CUDA GPU (bench/gpu_check.sh)"
    return dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, device="cuda", max_steps=60))


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_cuda_training_reaches_the_loss_of_eager(cuda_cfg, mode):
    """Each compile mode (reduce-overhead: the step replayed as CUDA graphs) trains the same run as eager."""
    results = {}
    for setting in ("false", "true"):
        tracker = NullTracker()
        t = dataclasses.replace(cuda_cfg.train, compile=setting, compile_mode=mode)
        results[setting] = (train(dataclasses.replace(cuda_cfg, train=t), tracker), tracker)
    (eager, _), (compiled, tracker) = results["false"], results["true"]
    assert tracker.params["compiled"] == "True" and tracker.metrics["compile_seconds"][0][1] > 0
    assert tracker.params["cuda_graphs"] == str(mode == "reduce-overhead")
    assert compiled.steps == eager.steps == 60
    assert abs(compiled.best_val_loss - eager.best_val_loss) < 0.05


def test_a_nan_on_cuda_is_caught_at_the_next_evaluation(cuda_cfg):
    t = dataclasses.replace(cuda_cfg.train, lr=1e6, warmup_steps=0, validation_interval=10)
    res = train(dataclasses.replace(cuda_cfg, train=t), NullTracker())
    assert res.stop_reason == "diverged" and res.steps == t.validation_interval
    assert math.isnan(res.best_val_loss)  # nothing was ever good enough to keep


def test_a_worker_over_its_share_of_gpu_memory_fails_with_the_reason():
    """Four workers share the GPU: each may use 22% of it; asking for half fails in that worker."""
    code = ("import torch\n"
            "from charlm.device import guard_memory, explain\n"
            "assert guard_memory('cuda') is not None\n"
            "free, total = torch.cuda.mem_get_info()\n"
            "try:\n"
            "    torch.empty(int(total * 0.5), dtype=torch.uint8, device='cuda')\n"
            "except Exception as e:\n"
            "    print(explain(e))\n")
    r = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CHARLM_GPU_WORKERS": "4"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("out of GPU memory: this worker may use 22% of a GPU it shares with 3 other worker(s)")


def test_a_mixture_trained_on_cuda_fits_its_gate_and_scores_the_same_reloaded(cuda_cfg, tmp_path):
    """make best on gpu.yaml: the network trains on the GPU, compiled as there, the gate is fitted from
    parts scored to the CPU into a buffer on the GPU, and the saved mixture scores on the CPU as the
    run reported."""
    from charlm import checkpoint
    from charlm.data import load_corpus
    from charlm.evaluate import full_pass

    cfg = dataclasses.replace(cuda_cfg, model=dataclasses.replace(cuda_cfg.model, mix_order=4),
                              train=dataclasses.replace(cuda_cfg.train, compile="true"))
    tracker = NullTracker(tmp_path)
    res = train(cfg, tracker)
    assert tracker.params["compiled"] == "True"
    assert 0 < res.mixture["mix_weight"] < 1
    mix, val = checkpoint.load(res.checkpoint).model, load_corpus(cfg.data).val
    mixed = full_pass(mix, val).loss
    assert mixed == pytest.approx(res.best_val_loss, abs=1e-4)  # a GPU's sums, not the CPU's bit for bit
    mix.set_weight(1.0)
    assert full_pass(mix, val).loss > mixed  # the network alone


def test_a_state_saved_on_cuda_restores_the_gpus_random_stream(cuda_cfg, tmp_path):
    """Dropout on the GPU draws from the GPU's generator: a resumed run (a promoted trial, an
    interrupted seed) carries on its stream where the state was saved, not from the seed."""
    from charlm.loop import TrainState
    from charlm.trainer import resume, setup

    run = setup(cuda_cfg, NullTracker(), None)  # seeds every generator
    state = resume(run, None)
    torch.rand(5, device="cuda")  # a few steps' dropout masks
    state.save(tmp_path / "state.pt", run)
    want = torch.rand(8, device="cuda")
    assert TrainState.load(tmp_path / "state.pt", setup(cuda_cfg, NullTracker(), None)) is not None
    assert torch.equal(torch.rand(8, device="cuda"), want)
    blob = torch.load(tmp_path / "state.pt", weights_only=True)
    blob["cuda_rng"] = [blob["cuda_rng"]]  # as states were saved before: one per visible GPU
    torch.save(blob, tmp_path / "state.pt")
    assert TrainState.load(tmp_path / "state.pt", setup(cuda_cfg, NullTracker(), None)) is not None
    assert torch.equal(torch.rand(8, device="cuda"), want)
