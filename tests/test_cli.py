import re
import subprocess

import pytest

from charlm.tracking import NullTracker
from charlm.trainer import train
from helpers import PYTHON, ROOT, cli


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, tiny_text):
    from charlm import config

    cfg = config.load(None, [f"data.path={tiny_text}", "data.context=16", "model.n_layer=1", "model.n_head=2",
                             "model.n_embd=32", "train.max_steps=20", "train.validation_interval=10",
                             "train.eval_chars=500", "train.sample_chars=0"])
    res = train(cfg, NullTracker(tmp_path_factory.mktemp("run")))
    return res.checkpoint


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
    for delay in (0.0, 0.05, 0.13, 0.29):  # after the writer's first save, whatever the machine's load
        target.unlink(missing_ok=True)
        proc = subprocess.Popen([PYTHON, "-c", writer])
        deadline = time.time() + 120
        while not target.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert target.exists(), "the writer never saved"
        assert checkpoint.load(target).meta == checkpoint.load(model_file).meta


def _in_pty(args, env) -> tuple[int, str]:
    """Run ``python -m charlm ARGS`` with a pseudo-terminal as its stdin, stdout and stderr."""
    import os
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: a terminal 120 columns wide (a new pty has 0), then exec
        import fcntl
        import struct
        import termios

        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
        os.execve(PYTHON, [PYTHON, "-m", "charlm", *args], env)
    chunks = []
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), b"".join(chunks).decode("utf-8", "replace")


def test_progress_is_a_live_bar_in_a_terminal_and_plain_lines_under_ci(tiny_cfg, tmp_path):
    import os

    from charlm.config import dump_yaml

    exp = tmp_path / "tiny.yaml"
    exp.write_text(dump_yaml(tiny_cfg))
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    code, out = _in_pty(["train", str(exp), "--no-track"], env)
    assert code == 0, out[-2000:]
    # tqdm redraws one line in place: carriage returns, a step counter, the postfix fields
    assert "\r" in out and "40/40" in out and "val=" in out and "tok_s=" in out
    assert "step 10/40 loss" not in out
    code, out = _in_pty(["train", str(exp), "--no-track"], {**env, "CI": "true"})
    assert code == 0, out[-2000:]
    lines = [x for x in out.replace("\r\n", "\n").split("\n") if x.startswith("train tiny step")]
    assert "\r" not in out.replace("\r\n", "\n")
    assert [x.split()[3] for x in lines] == ["10/40", "20/40", "30/40", "40/40"]
    assert all(" loss " in x and " val " in x and "tok/s" in x for x in lines)
    # not a terminal at all (a log file, a pipe): the same plain lines
    r = subprocess.run([PYTHON, "-m", "charlm", "train", str(exp), "--no-track"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0 and r.stderr.count("train tiny step") == 4 and "\r" not in r.stderr


def test_a_run_whose_budget_is_the_clock_tells_its_progress_in_minutes_not_as_a_share_of_the_step_cap(
        tiny_cfg, tmp_path):
    """sweeps/default.yaml sets max_steps 1,000,000 under a clock: "step 226/1131903" told the user nothing."""
    import os

    from charlm.config import dump_yaml

    exp = tmp_path / "tiny.yaml"
    exp.write_text(dump_yaml(tiny_cfg))
    r = subprocess.run([PYTHON, "-m", "charlm", "train", str(exp), "--no-track", "--set", "train.max_steps=1000000",
                        "train.max_minutes=0.05"], capture_output=True, text=True,
                       env={**os.environ, "CI": "true"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [x for x in r.stderr.splitlines() if x.startswith("train tiny step")]
    assert lines and all(re.match(r"train tiny step \d+ at \d\.\d\d/0\.05 min loss ", x) for x in lines), lines[:3]
