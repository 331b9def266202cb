"""The MLflow UI as users meet it: `make ui` over a real sweep's store, driven in headless
Chromium (Debian's /usr/bin/chromium through Playwright; no browser is ever downloaded)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import PYTHON, ROOT, free_port

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


@pytest.mark.slow
def test_mlflow_ui_shows_trials_nested_under_the_study_and_compares_them(tmp_path):
    assert Path(CHROMIUM).is_file(), "install Debian's chromium package (.ci/run does)"
    from playwright.sync_api import sync_playwright

    r = subprocess.run([PYTHON, "-m", "charlm", "sweep", str(ROOT / "sweeps" / "smoke.yaml"), "--workers", "2"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    port = free_port()
    server = subprocess.Popen(["make", "-s", "-C", str(ROOT), "ui", f"PORT={port}", f"STORE={tmp_path / 'mlruns'}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "make ui did not come up"
                time.sleep(1)
        exp = _api(port, "experiments/get-by-name?experiment_name=smoke")["experiment"]["experiment_id"]
        runs = _api(port, "runs/search", {"experiment_ids": [exp], "max_results": 100})["runs"]
        tags = {x["info"]["run_id"]: {t["key"]: t["value"] for t in x["data"].get("tags", [])} for x in runs}
        parent = next(i for i, t in tags.items() if t.get("charlm.role") == "study")
        trials = sorted((t["mlflow.runName"], i) for i, t in tags.items() if t.get("mlflow.parentRunId") == parent)
        assert len(trials) == 8

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/#/experiments/{exp}/runs")
            study_row = page.locator("[role=row]", has_text="study-smoke")
            study_row.first.wait_for(timeout=60_000)
            # the trials are children of the study run: hidden until its row is expanded
            assert page.get_by_text("trial-000", exact=True).count() == 0
            study_row.locator('button[data-component-id*="runnamecellrenderer"]').click()
            for name, _ in trials:
                page.get_by_text(name, exact=True).first.wait_for(timeout=30_000)
            rows = page.locator("[role=row]").all_inner_texts()
            at = next(i for i, text in enumerate(rows) if "study-smoke" in text)
            below = " ".join(rows[at + 1:at + 1 + len(trials)])
            assert all(name in below for name, _ in trials), "the trials are not listed under the study run"
            with_assistant = page.get_by_role("button", name="Close")
            if with_assistant.count():
                with_assistant.first.click()  # the assistant panel hides half the table
            page.wait_for_timeout(500)
            page.screenshot(path=shots / "mlflow_runs.png")

            ids = [i for _, i in trials]
            page.goto(f"http://127.0.0.1:{port}/#/compare-runs?runs={json.dumps(ids)}&experiments={json.dumps([exp])}")
            page.get_by_text("val_loss").first.wait_for(timeout=60_000)
            page.wait_for_timeout(1500)
            body = page.inner_text("body")
            assert f"Comparing {len(ids)} Runs" in body
            for key in ("val_loss", "train.lr", "train.patience", "model.kind"):
                assert key in body, key
            page.screenshot(path=shots / "mlflow_compare.png")
            browser.close()
        assert (shots / "mlflow_runs.png").stat().st_size > 10_000
        if os.environ.get("CHARLM_SCREENSHOTS"):  # refresh the README's pictures
            for f in shots.iterdir():
                shutil.copy(f, Path(os.environ["CHARLM_SCREENSHOTS"]) / f.name)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    # the server is gone with its port
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
