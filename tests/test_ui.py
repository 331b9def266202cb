"""The MLflow UI as users meet it: `make ui` over a real sweep's store (and its best model,
registered), driven in headless Chromium (Debian's /usr/bin/chromium through Playwright; no browser
is ever downloaded), each page from a fresh browser profile."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from helpers import PYTHON, ROOT, SMOKE, free_port, wait_for_http

CHROMIUM = "/usr/bin/chromium"
# headless as root, and quiet: this machine's closed network refuses Chromium's background calls
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


def _api(port: int, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/{path}",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """A smoke sweep, its best model (seed 0) registered, and `make ui` over their store."""
    assert Path(CHROMIUM).is_file(), "install Debian's chromium package (.ci/run does)"
    cwd = tmp_path_factory.mktemp("ui")
    r = subprocess.run([PYTHON, "-m", "charlm", "sweep", str(SMOKE), "--workers", "2"],
                       cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    printed = re.search(r"MLflow runs \(make ui\): (\S+)", r.stdout).group(1)
    best = subprocess.run([PYTHON, "-m", "charlm", "best", str(SMOKE), "--seeds", "0"],
                          cwd=cwd, capture_output=True, text=True, timeout=600)
    assert best.returncode == 0, best.stderr[-2000:]
    port = free_port()
    # make with the venv running these tests, taken as installed (-o: no reinstall from the stamp's age)
    venv = Path(sys.prefix)
    server = subprocess.Popen(["make", "-s", "-C", str(ROOT), "-o", str(venv / ".installed"), "ui", f"VENV={venv}",
                               f"PORT={port}", f"STORE={cwd / 'mlruns'}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    shots = cwd / "screenshots"
    shots.mkdir()
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", server, 120)
        yield port, printed.replace("127.0.0.1:5000", f"127.0.0.1:{port}"), shots
        if os.environ.get("CHARLM_SCREENSHOTS"):  # refresh the docs' pictures
            for f in shots.iterdir():
                shutil.copy(f, Path(os.environ["CHARLM_SCREENSHOTS"]) / f.name)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    # the server is gone with its port
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def fresh_page(browser):
    """A page in a new browser context: no saved UI state (view switch, columns, panels)."""
    return browser.new_context(viewport={"width": 1400, "height": 900}).new_page()


def close_assistant(page) -> None:
    button = page.get_by_role("button", name="Close")
    if button.count():
        button.first.click()  # the assistant panel hides half the page
    page.wait_for_timeout(500)


def study_trials(port: int) -> tuple[str, list[tuple[str, str]]]:
    exp = _api(port, "experiments/get-by-name?experiment_name=smoke")["experiment"]["experiment_id"]
    runs = _api(port, "runs/search", {"experiment_ids": [exp], "max_results": 100})["runs"]
    tags = {x["info"]["run_id"]: {t["key"]: t["value"] for t in x["data"].get("tags", [])} for x in runs}
    parent = next(i for i, t in tags.items() if t.get("charlm.role") == "study")
    return exp, sorted((t["mlflow.runName"], i) for i, t in tags.items() if t.get("mlflow.parentRunId") == parent)


@pytest.mark.slow
def test_printed_link_opens_the_runs_with_trials_nested_under_the_study_and_their_dataset(ui, browser):
    port, printed, shots = ui
    exp, trials = study_trials(port)
    assert len(trials) == 8
    assert printed == f"http://127.0.0.1:{port}/#/experiments/{exp}/runs?workflowType=machine_learning"
    page = fresh_page(browser)
    page.goto(printed)  # what `make sweep` printed, in a browser that never saw MLflow
    study_row = page.locator("[role=row]", has_text="study-smoke")
    study_row.first.wait_for(timeout=60_000)
    # the model-training view (Runs, Models, Model registry), not GenAI's overview of traces
    nav = page.inner_text("body")
    assert "Model registry" in nav and "Tool calls" not in nav and "/overview" not in page.url
    # the trials are children of the study run: hidden until its row is expanded
    assert page.get_by_text("trial-000", exact=True).count() == 0
    study_row.locator('button[data-component-id*="runnamecellrenderer"]').click()
    for name, _ in trials:
        page.get_by_text(name, exact=True).first.wait_for(timeout=30_000)
    rows = page.locator("[role=row]").all_inner_texts()
    at = next(i for i, text in enumerate(rows) if "study-smoke" in text)
    below = rows[at + 1:at + 1 + len(trials)]
    assert all(name in " ".join(below) for name, _ in trials), "the trials are not listed under the study run"
    # the Dataset column names the corpus: on the baseline's row and each trial's (pinned name
    # cells and the other cells are separate rows in the grid's markup, so count the cells)
    datasets = page.get_by_text("tinyshakespeare.txt")
    assert datasets.count() >= len(trials) + 1, datasets.all_inner_texts()
    close_assistant(page)
    page.screenshot(path=shots / "mlflow_runs.png")
    top = page.locator("[role=row]").first.bounding_box()
    right = datasets.last.bounding_box()
    page.screenshot(path=shots / "mlflow_datasets.png", clip={  # the table alone: names and datasets
        "x": top["x"], "y": top["y"], "width": right["x"] + right["width"] + 8 - top["x"],
        "height": right["y"] + right["height"] + 8 - top["y"]})
    assert (shots / "mlflow_runs.png").stat().st_size > 10_000

    ids = [i for _, i in trials]
    page.goto(f"http://127.0.0.1:{port}/#/compare-runs?runs={json.dumps(ids)}&experiments={json.dumps([exp])}")
    page.get_by_text("val_loss").first.wait_for(timeout=60_000)
    page.wait_for_timeout(1500)
    body = page.inner_text("body")
    assert f"Comparing {len(ids)} Runs" in body
    for key in ("val_loss", "train.lr", "train.patience", "model.kind"):
        assert key in body, key
    page.screenshot(path=shots / "mlflow_compare.png")


@pytest.mark.slow
def test_registry_shows_the_best_model_with_its_champion_alias(ui, browser):
    port, _, shots = ui
    page = fresh_page(browser)
    page.goto(f"http://127.0.0.1:{port}/#/models?workflowType=machine_learning")
    row = page.locator("[role=row], tr", has_text="charlm-smoke").first
    row.wait_for(timeout=60_000)
    assert "champion" in row.inner_text() and "Version 1" in row.inner_text()
    page.goto(f"http://127.0.0.1:{port}/#/models/charlm-smoke/versions/1?workflowType=machine_learning")
    page.get_by_text(re.compile(r"best-trial-\d+")).first.wait_for(timeout=60_000)  # the source run
    assert "champion" in page.inner_text("body")
    page.goto(f"http://127.0.0.1:{port}/#/models/charlm-smoke?workflowType=machine_learning")
    page.get_by_text("Version 1").first.wait_for(timeout=60_000)
    page.wait_for_timeout(1000)
    close_assistant(page)
    assert "champion" in page.inner_text("body")
    page.screenshot(path=shots / "mlflow_registry.png")


@pytest.mark.slow
def test_the_docs_site_builds_strict_and_its_home_and_reference_pages_render(browser, tmp_path):
    site = tmp_path / "site"
    r = subprocess.run([PYTHON, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(site)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    port = free_port()
    server = subprocess.Popen([PYTHON, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(site)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/", server, 30)
        page = fresh_page(browser)
        page.goto(f"http://127.0.0.1:{port}/")
        body = page.inner_text("body")
        for section in ("Tutorial", "How-to guides", "Reference", "Explanation", "Results"):
            assert section in body, f"the home page's navigation lacks {section}"
        assert "make all BUDGET=" in body
        page.screenshot(path=tmp_path / "site_home.png")
        page.goto(f"http://127.0.0.1:{port}/reference/cli/")
        page.get_by_text("--budget").first.wait_for(timeout=30_000)  # the generated page, as built
        assert "make bench-seeds" in page.inner_text("body")
        page.screenshot(path=tmp_path / "site_reference.png")
        if os.environ.get("CHARLM_SCREENSHOTS"):
            for name in ("site_home.png", "site_reference.png"):
                shutil.copy(tmp_path / name, Path(os.environ["CHARLM_SCREENSHOTS"]) / name)
    finally:
        server.terminate()
        server.wait(timeout=30)
