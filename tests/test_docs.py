"""The docs describe the code as it stands: the reference pages are rendered from it, every command
and config block in README.md and docs/ is parsed by the code that would run it, the layout lists
every module, and each figure names its run."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from helpers import ROOT

spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs" / "gen_reference.py")
gen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gen)

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
MAKEFILE = (ROOT / "Makefile").read_text(encoding="utf-8")
MAKE_VARS = set(re.findall(r"^(?:export )?([A-Z_]+)\s*[:?]?=", MAKEFILE, re.M))
MAKE_TARGETS = {t for t, _ in gen.make_targets()}


def blocks(lang: str) -> list[tuple[str, str]]:
    """``(where, body)`` of every fenced block of this language in README.md and docs/."""
    out = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in BLOCK.finditer(text):
            if m.group(1) == lang:
                out.append((f"{page.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}", m.group(2)))
    return out


# ----------------------------------------------------------------------------- commands


def _charlm_args(argv: list[str], where: str) -> None:
    """Parse ``python -m charlm`` arguments with the real parser, as the command would."""
    from charlm.__main__ import build_parser

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:
            raise AssertionError(f"{where}: `python -m charlm {' '.join(argv)}` is refused: {err.getvalue().strip()}") from e
    if args.command == "train" and args.set and (ROOT / args.experiment).is_file():
        from charlm import config

        config.load(ROOT / args.experiment, args.set)  # a --set key that is no config key fails here


def _make(tokens: list[str], where: str) -> None:
    targets = [t for t in tokens if "=" not in t and not t.startswith("-")]
    assigned = [t.split("=", 1)[0] for t in tokens if "=" in t]
    assert targets and all(t in MAKE_TARGETS for t in targets), f"{where}: no such make target in {targets}"
    assert all(v in MAKE_VARS for v in assigned), f"{where}: make has no variable {set(assigned) - MAKE_VARS}"
    venv = Path(sys.prefix)  # what the recipe would run, without running it (-n) or reinstalling (-o)
    r = subprocess.run(["make", "-n", "-s", "-C", str(ROOT), "-o", str(venv / ".installed"), f"VENV={venv}", *tokens],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"{where}: make -n {' '.join(tokens)}: {r.stderr.strip()}"
    for line in r.stdout.splitlines():
        if " -m charlm " in line:
            _charlm_args(shlex.split(line.split(" -m charlm ", 1)[1]), f"{where} (through make)")


def check_command(line: str, where: str) -> None:
    """One command line of a ```bash block: make targets and variables exist and the charlm command
    they run parses; ``python -m charlm`` parses; a script named exists. Others (curl, export) pass."""
    tokens = shlex.split(line)
    if not tokens:
        return
    if tokens[0] == "make":
        _make(tokens[1:], where)
    elif tokens[:3] == ["python", "-m", "charlm"] or tokens[0] == "charlm":
        _charlm_args(tokens[3:] if tokens[0] == "python" else tokens[1:], where)
    elif tokens[0] in ("python", "python3", "bash") and tokens[1].endswith((".py", ".sh")):
        assert (ROOT / tokens[1]).is_file(), f"{where}: {tokens[1]} does not exist"


def _uncommented(line: str) -> str:
    """The line up to a ``#`` that starts a shell comment: after a space (or first), outside quotes."""
    quote = None
    for i, c in enumerate(line):
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def command_lines(body: str) -> list[str]:
    """A block's commands: continuations joined, comments dropped."""
    return [x for x in (_uncommented(line) for line in body.replace("\\\n", " ").splitlines()) if x.strip()]


@pytest.mark.parametrize("where,body", blocks("bash"), ids=lambda x: x if ":" in str(x) else "")
def test_every_command_in_the_docs_runs_as_written(where, body):
    for line in command_lines(body):
        check_command(line, where)


def test_a_renamed_flag_or_target_in_a_command_block_fails():
    for bad in ("python -m charlm sweep sweeps/smoke.yaml --budgett 45m", "make sweep SWEEPS=sweeps/smoke.yaml",
                "make sweeps", "python -m charlm train experiments/gpt.yaml --set model.n_layr=3",
                "make train SET=model.n_layr=3"):
        with pytest.raises((AssertionError, Exception)) as e:
            check_command(bad, "test")
        assert "n_layr" in str(e.value) or "test" in str(e.value)
    check_command("make all BUDGET=12m TEXT=my.txt SEED=1", "test")  # and a good one passes


# ----------------------------------------------------------------------------- YAML


def _strip_comment(line: str) -> str:
    return re.sub(r"\s+#.*$", "", line).rstrip()


def check_yaml(body: str, tmp: Path) -> None:
    """An excerpt (first line ``# <path>`` or ``# <path> (abridged)``) must be the file's lines in
    its order; any other block is merged over sweeps/smoke.yaml (a sweep fragment) or
    experiments/gpt.yaml (an experiment fragment) section by section and loaded."""
    head = re.match(r"# (\S+\.ya?ml)( \(abridged\))?\n", body)
    if head:
        shipped = [_strip_comment(x) for x in (ROOT / head.group(1)).read_text(encoding="utf-8").splitlines()]
        shipped = [x for x in shipped if x and not x.lstrip().startswith("#")]
        shown = [_strip_comment(x) for x in body.splitlines()[1:]]
        shown = [x for x in shown if x and not x.lstrip().startswith("#")]
        if head.group(2):
            it = iter(shipped)
            missing = [x for x in shown if not any(x == y for y in it)]
            assert not missing, f"the {head.group(1)} excerpt differs from the file at: {missing[0]!r}"
        else:
            assert shown == shipped, f"the block is not {head.group(1)}"
        return
    from charlm import config
    from charlm.sweepfile import _TOP, load_sweep

    fragment = yaml.safe_load(body)
    assert isinstance(fragment, dict) and fragment, "a YAML block must be a mapping"
    experiment = set(fragment) <= {"data", "model", "train", "experiment", "name"}
    assert experiment or set(fragment) <= set(_TOP), f"neither an experiment nor a sweep file: {sorted(fragment)}"
    base = yaml.safe_load((ROOT / ("experiments/gpt.yaml" if experiment else "sweeps/smoke.yaml")).read_text())
    for k, v in fragment.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and isinstance(base.get(k), dict) and k != "space" else v
    f = tmp / "block.yaml"
    f.write_text(yaml.safe_dump(base))
    config.load(f) if experiment else load_sweep(f)


@pytest.mark.parametrize("where,body", blocks("yaml"), ids=lambda x: x if ":" in str(x) else "")
def test_every_yaml_block_in_the_docs_loads_or_matches_its_file(where, body, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # a sweep file's base and baseline are paths from the checkout
    try:
        check_yaml(body, tmp_path)
    except Exception as e:
        raise AssertionError(f"{where}: {e}") from e


def test_a_broken_yaml_block_fails(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    for bad in ("train: {lr: fast}", "pruner: {type: ashaa}", "space:\n  train.lrr: {float: [0.001, 0.01]}",
                "# sweeps/default.yaml (abridged)\nstudy: {name: other}"):
        with pytest.raises(Exception):  # noqa: B017 (ConfigError, SweepError or AssertionError, each one line)
            check_yaml(bad, tmp_path)
    check_yaml("train: {lr: 0.003}", tmp_path)  # and a good one passes


# ----------------------------------------------------------------------------- generated reference pages


def test_the_reference_pages_are_what_the_code_renders():
    assert gen.stale() == [], "run `make docs` and commit docs/reference/"


def test_a_removed_flag_or_config_key_changes_the_page_and_a_stale_copy_fails(tmp_path):
    from charlm import config
    from charlm.__main__ import build_parser

    parser = build_parser()
    train = next(a for a in parser._actions if a.dest == "command").choices["train"]
    train._remove_action(next(a for a in train._actions if "--dry-run" in a.option_strings))
    without_flag = gen.render_cli(parser)
    assert without_flag != gen.render_cli() and "`--out`" in without_flag
    assert gen.render_cli().split("### sweep")[0].count("`--dry-run`") == 1
    assert without_flag.split("### sweep")[0].count("`--dry-run`") == 0

    @dataclass(frozen=True)
    class DataWithoutContext:
        path: str = ""  # a UTF-8 text file
        val_fraction: float = 0.1  # after train
        test_fraction: float = 0.1  # at the end

    without_key = gen.render_config({**config.SECTIONS, "data": DataWithoutContext})
    assert "`data.context`" in gen.render_config() and "`data.context`" not in without_key

    docs = tmp_path / "docs"
    (docs / "reference").mkdir(parents=True)
    for rel in gen.PAGES:
        (docs / rel).write_text(gen.PAGES[rel]())
    assert gen.stale(docs) == []
    (docs / "reference" / "cli.md").write_text(without_flag)  # a copy written before the flag came back
    assert gen.stale(docs) == [docs / "reference" / "cli.md"]


def test_the_stop_reasons_are_listed_once_and_as_the_code_defines_them():
    from charlm.loop import StopReason

    page = (ROOT / "docs" / "reference" / "mlflow.md").read_text(encoding="utf-8")
    listed = re.findall(r"^\| `(\w+)` \|", page.split("<!-- begin generated: stop-reasons -->")[1], re.M)
    assert listed[:len(StopReason)] == [r.value for r in StopReason]
    for p in PAGES:  # no hand-written list of them to drift
        assert not re.search(r"early_stop \| max_steps", p.read_text(encoding="utf-8")), p


# ----------------------------------------------------------------------------- README and layout


def test_the_readme_is_a_landing_page_whose_first_screen_gives_the_quick_start():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines"
    first = "\n".join(lines[:50])
    assert "make all BUDGET=" in first and "make sweep SWEEP=sweeps/smoke.yaml" in first


def test_the_readme_commands_table_lists_every_make_target():
    table = README.read_text(encoding="utf-8").split("## Commands")[1].split("\n## ")[0]
    listed = set(re.findall(r"^\| `make ([\w-]+)", table, re.M)) | set(re.findall(r"`make ([\w-]+)`", table))
    assert listed == MAKE_TARGETS, f"missing: {MAKE_TARGETS - listed}; gone: {listed - MAKE_TARGETS}"


def test_layout_lists_every_module_and_nothing_else():
    page = (ROOT / "docs" / "reference" / "layout.md").read_text(encoding="utf-8")
    block = re.search(r"```text\n(.*?)```", page, re.S).group(1)
    listed, folder = set(), None
    for line in block.splitlines():
        top = re.match(r"^(\S+/)", line)
        if top:
            folder = top.group(1)
            continue
        entry = re.match(r"^  (\S+\.py|\S+/)\s", line + " ")
        if entry and folder:
            listed.add(folder + entry.group(1))
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "charlm").rglob("*.py") if p.name != "__init__.py"}
    shipped |= {str(p.relative_to(ROOT)) for p in (ROOT / "bench").glob("*.py")}
    shipped |= {str(p.relative_to(ROOT)) for p in (ROOT / "charlm").iterdir() if p.is_dir() and p.name != "__pycache__"}
    shipped = {s + "/" if (ROOT / s).is_dir() else s for s in shipped}
    assert listed == shipped, f"missing from the layout: {sorted(shipped - listed)}; gone from the code: {sorted(listed - shipped)}"


# ----------------------------------------------------------------------------- figures


def test_every_figure_names_its_run_on_the_results_page():
    results = (ROOT / "docs" / "results.md").read_text(encoding="utf-8").split("## Figures")[1]
    for png in sorted((ROOT / "docs").rglob("*.png")):
        row = next((x for x in results.splitlines() if f"`{png.name}`" in x), None)
        assert row and re.search(r"commit [0-9a-f]{7}|this page's last change", row), f"{png.name} names no run"


def test_the_readme_figures_are_the_results_page_figures():
    readme = README.read_text(encoding="utf-8").split("## Results")[1].split("\n## ")[0]
    results = (ROOT / "docs" / "results.md").read_text(encoding="utf-8")
    for figure in re.findall(r"\b1\.\d{3,4}\b", readme):
        assert figure in results or figure.rstrip("0") in results, f"README's {figure} is on no results row"
    for commit in re.findall(r"commit ([0-9a-f]{7})", readme):
        assert commit in results


def test_the_site_builds_strict():
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(ROOT / "site")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stderr[-3000:]


def test_every_readme_link_lands_on_a_file():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text(encoding="utf-8")):
        if not target.startswith("http"):
            assert (ROOT / target).is_file(), f"README links to {target}, which does not exist"


def test_field_notes_read_the_reason_beside_each_default():
    from charlm.config import TrainConfig

    notes = gen.field_notes(TrainConfig)
    assert set(notes) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert notes["lr"].startswith("peak AdamW learning rate")
