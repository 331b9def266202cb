import subprocess

import pytest

from charlm.tracking import NullTracker
from charlm.train import train

from conftest import PYTHON, ROOT


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, tiny_text):
    from charlm import config

    cfg = config.load(None, [f"data.path={tiny_text}", "data.context=16", "model.n_layer=1", "model.n_head=2",
                             "model.n_embd=32", "train.max_steps=20", "train.validation_interval=10",
                             "train.eval_chars=500", "train.sample_chars=0"])
    res = train(cfg, NullTracker(tmp_path_factory.mktemp("run")))
    return res.checkpoint


def cli(*args, cwd=None):
    return subprocess.run([PYTHON, "-m", "charlm", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_sample_continues_the_prompt(model_file):
    r = cli("sample", "--model", str(model_file), "--prompt", "ROMEO:", "--chars", "50", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO:") and len(r.stdout.rstrip("\n")) >= 50
    again = cli("sample", "--model", str(model_file.parent), "--prompt", "ROMEO:", "--chars", "50", "--seed", "3")
    assert again.stdout == r.stdout  # a folder holding model.pt works, and the seed fixes the text


def test_eval_lists_unknown_characters_and_can_skip_them(model_file, tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("To be, or not to be: that is the question {}")
    r = cli("eval", "--model", str(model_file), "--text", str(f))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "2 character(s) not in the model's vocabulary: '{', '}'" in r.stderr
    r = cli("eval", "--model", str(model_file), "--text", str(f), "--skip-unknown", "--json")
    assert r.returncode == 0 and '"chars": 41' in r.stdout


@pytest.mark.parametrize("content,needle", [
    (None, "Checkpoint not found"),
    (b"", "unreadable or corrupt"),
    (b"garbage" * 100, "unreadable or corrupt"),
])
def test_bad_checkpoints_get_one_line(tmp_path, content, needle):
    path = tmp_path / "model.pt"
    if content is not None:
        path.write_bytes(content)
    r = cli("eval", "--model", str(path), "--split", "val")
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr


def test_truncated_checkpoint(model_file, tmp_path):
    cut = tmp_path / "model.pt"
    cut.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    r = cli("sample", "--model", str(cut))
    assert r.returncode == 2 and "unreadable or corrupt" in r.stderr


def test_help_matches_the_commands():
    r = cli("--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("train", "eval", "sample"))
    r = subprocess.run(["make", "-s", "help"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    for target in ("install", "train", "test", "ui", "clean", "bench"):
        assert f"make {target}" in r.stdout


def test_checkpoints_that_are_not_ours_or_do_not_match(model_file, tmp_path):
    import torch

    from charlm import checkpoint
    from charlm.checkpoint import CheckpointError

    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="is not a charlm checkpoint"):
        checkpoint.load(foreign)
    blob = torch.load(model_file, weights_only=True)
    blob["config"]["model"]["n_layer"] = 2  # the weights are for one layer
    mismatched = tmp_path / "mismatched.pt"
    torch.save(blob, mismatched)
    with pytest.raises(CheckpointError, match="does not match its own config"):
        checkpoint.load(mismatched)
    blob = torch.load(model_file, weights_only=True)
    blob["vocab"] = blob["vocab"][:-1]  # a vocabulary one character short of the weights
    short = tmp_path / "short.pt"
    torch.save(blob, short)
    r = cli("eval", "--model", str(short), "--split", "val")
    assert r.returncode == 2 and "does not match its own config" in r.stderr


def test_sample_prompt_with_unknown_characters(model_file):
    r = cli("sample", "--model", str(model_file), "--prompt", "ROMEO{")
    assert r.returncode == 2 and "1 character(s) not in the model's vocabulary: '{'" in r.stderr
    r = cli("sample", "--model", str(model_file), "--prompt", "ROMEO{", "--skip-unknown", "--chars", "5")
    assert r.returncode == 0 and r.stdout.startswith("ROMEO")


def test_a_kill_mid_write_never_leaves_a_checkpoint_that_loads_wrong(model_file, tmp_path):
    """SIGKILL a process that rewrites a checkpoint in a loop, at arbitrary moments: the file on
    disk always loads (temp file + rename), and no half-written temp file is taken for it."""
    import signal
    import time

    from charlm import checkpoint

    target = tmp_path / "model.pt"
    writer = (f"from charlm import checkpoint\nck = checkpoint.load({str(model_file)!r})\n"
              f"while True:\n    checkpoint.save(__import__('pathlib').Path({str(target)!r}), ck.model, ck.cfg, ck.vocab, ck.meta)\n")
    for delay in (0.5, 0.8, 1.1, 1.4):
        proc = subprocess.Popen([PYTHON, "-c", writer])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if target.exists():
            assert checkpoint.load(target).meta == checkpoint.load(model_file).meta
    assert target.exists()
