"""The web UI end to end in real headless Chromium (Debian's package, driven by Playwright).

Log in through the printed link, be refused a run whose data path does not exist (the form
shows the preflight's error; no run folder), preview the demo data and start a run of a tiny
model from the form, watch its loss chart gain points until it succeeds, start a second run,
restart the UI while it goes (it still shows as running and its charts continue), cancel it
from its page (the button stays disabled until the run has ended), resume it and cancel it
again, compare the two runs, see the runs table fit the page at 1024 and 1440 px, delete a
run, and read the statuses back through `longtune runs list`.

Set LONGTUNE_UPDATE_DOCS=1 to refresh the screenshot in docs/ (the run page of the first run).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import yaml
from ui_server import ROOT, UIServer, kill_runs, runs_list_cli

from longtune.run_dir import RunDir, mark_run, read_metrics, write_status

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
EXTRA = "\n".join(
    [
        "--data.overlength=split",  # the demo examples are far longer than 128 tokens
        "--train.eval_batches=2",
        "--train.eval_every=4",
        "--model.activation_checkpointing=none",
    ]
)

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):  # CI installs it through ./run.sh: a missing browser is a failure
        raise RuntimeError(f"{CHROMIUM} is missing; ./run.sh test installs Debian's chromium")
    pytest.skip("needs Debian's chromium package (./run.sh installs it)", allow_module_level=True)


def points(page, chart: str = "#chart-loss") -> int:
    return int(page.get_attribute(chart, "data-points") or 0)


def wait_points(page, at_least: int, timeout_s: float) -> int:
    page.wait_for_function(
        f"() => Number(document.querySelector('#chart-loss').dataset.points) >= {at_least}",
        timeout=timeout_s * 1000,
    )
    return points(page)


# Records, from the moment it is installed, the cancel button's state with the run's status
# each time either changes.
# Records the cancel button's state at every change from the click on (a poll that rewrites the
# status text between this and the click is not the button's doing: it was logged as clickable).
WATCH_CANCEL = """() => {
  window.cancelLog = [];
  let clicked = false;
  const button = document.querySelector('#cancel'), status = document.querySelector('#status');
  document.addEventListener('click', (e) => { if (e.target === button) clicked = true; }, true);
  const note = () => clicked && window.cancelLog.push([status.textContent, button.disabled, button.hidden]);
  const watch = new MutationObserver(note);
  watch.observe(button, { attributes: true });
  watch.observe(status, { childList: true, characterData: true, subtree: true });
}"""


def old_run_with_a_default_name(runs_dir: Path) -> str:
    """A run as the form names them by default, with long paths, that died long ago."""
    name = "run-20251127-082602"
    run = RunDir(runs_dir / name)
    run.path.mkdir(parents=True)
    mark_run(run)
    model = "/home/someone/.cache/longtune/smollm2-135m-instruct-bfloat16"
    data = ["/srv/data/long-context/train-part-0001.jsonl", "/srv/data/long-context/x.jsonl"]
    run.config.write_text(yaml.safe_dump({"model": {"path": model}, "data": {"train": data}}))
    started = time.time() - 86400
    write_status(run, "failed", reason="process gone", step=7, total_steps=24, started_at=started)
    return name


def fill_new_run(page, name: str, model: Path, duration: str) -> None:
    page.click("nav >> text=New run")
    page.fill("input[name=name]", name)
    page.fill("input[name=model]", str(model))
    page.fill("input[name=context_length]", "128")
    page.fill("input[name=duration]", duration)
    page.fill("input[name=lr]", "1e-3")
    page.fill("textarea[name=extra]", EXTRA)


@pytest.mark.slow
def test_ui_end_to_end_in_chromium(tmp_path, ui_assets):
    from playwright.sync_api import expect, sync_playwright

    model = ui_assets["model"]
    runs_dir = tmp_path / "runs"
    env = {"LONGTUNE_CACHE": str(ui_assets["cache"])}
    ui = UIServer(runs_dir, allow=[ui_assets["models"]], env=env)
    js_errors: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),
                executable_path=CHROMIUM,
                headless=True,
                args=FLAGS,
                viewport={"width": 1280, "height": 900},
            )
            page = browser.new_page()
            page.on("pageerror", lambda e: js_errors.append(str(e)))
            page.on("dialog", lambda d: d.accept())
            page.set_default_timeout(30_000)
            # The UI's checks start a process (and the planner's child): seconds on a busy
            # machine, more than expect's own 5 s default.
            expect.set_options(timeout=30_000)

            # Log in through the printed link: the token leaves the URL, a cookie carries it.
            page.goto(ui.login_url)
            expect(page).to_have_url(f"{ui.base}/")
            expect(page.locator("#runs-body")).to_contain_text("No runs yet")

            # A data path that does not exist: the preflight's line in the form, no run folder.
            fill_new_run(page, "ghost", model, "20st")
            missing = ui_assets["models"] / "missing.jsonl"
            page.fill("textarea[name=train]", str(missing))
            page.click("#launch")
            expect(page.locator("#form-error")).to_have_text(
                f"data.train: {missing} does not exist"
            )
            expect(page).to_have_url(f"{ui.base}/new")
            assert not (runs_dir / "ghost").exists()

            # A run from the form, on the bundled demo data, after the data preview.
            fill_new_run(page, "first", model, "20st")
            page.click("#preview")
            expect(page.locator("#preview-stats tr")).to_have_count(3, timeout=60_000)
            expect(page.locator("#preview-stats")).to_contain_text("train.jsonl")
            expect(page.locator("#preview-examples .example")).to_have_count(3)
            assert page.locator("#preview-examples .target").count() >= 3
            page.click("#launch")
            expect(page).to_have_url(f"{ui.base}/runs/first", timeout=30_000)
            seen = [wait_points(page, 1, 120)]
            expect(page.locator("#status")).to_have_text("succeeded", timeout=120_000)
            expect(page.locator("#export-check")).to_contain_text("passed", timeout=30_000)
            seen.append(points(page))
            assert seen[-1] == 20 and seen[0] >= 1
            # The memory chart draws the planner's prediction beside the measured peaks.
            mem = page.locator("#chart-mem")
            expect(mem.locator(".u-legend")).to_contain_text("planned peak GiB")
            steps = [r for r in read_metrics(RunDir(runs_dir / "first")) if "loss" in r]
            assert float(mem.get_attribute("data-planned")) == steps[0]["predicted_peak_gb"] > 0
            page.wait_for_timeout(300)  # let the last poll settle before the picture
            shot = tmp_path / "ui-run.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("LONGTUNE_UPDATE_DOCS"):
                shutil.copy(shot, ROOT / "docs" / "ui-run.png")

            # The runs page lists it.
            page.click("nav >> text=Runs")
            row = page.locator("#runs-body tr[data-name=first]")
            expect(row).to_contain_text("succeeded")
            expect(row).to_contain_text("20/20")

            # A second, long run; the UI is stopped and started again while it goes.
            fill_new_run(page, "second", model, "100000st")
            page.click("#launch")
            expect(page).to_have_url(f"{ui.base}/runs/second", timeout=30_000)
            growing = wait_points(page, 1, 120)
            before_restart = wait_points(page, growing + 2, 60)  # the loss chart gains points
            port = ui.port
            ui.stop()
            ui = UIServer(runs_dir, allow=[ui_assets["models"]], port=port, env=env)
            page.goto(ui.login_url)
            page.goto(f"{ui.base}/runs/second")
            expect(page.locator("#status")).to_have_text("running")
            after_restart = wait_points(page, before_restart, 30)  # the metrics written so far
            wait_points(page, after_restart + 2, 60)  # and it goes on

            page.evaluate(WATCH_CANCEL)
            page.click("#cancel")
            expect(page.locator("#cancel")).to_be_disabled()
            expect(page.locator("#status")).to_have_text("cancelled", timeout=60_000)
            expect(page.locator("#cancel")).to_be_hidden()
            expect(page.locator("#message")).to_contain_text("checkpoint")  # where to resume from
            expect(page.locator("#message")).to_contain_text("press Resume to continue")
            # Never clickable again while the run still showed as running: one signal only.
            log = page.evaluate("window.cancelLog")
            assert log and log[0][1], log
            assert not [e for e in log if e[0] == "running" and not e[1] and not e[2]], log

            # Resume it from that checkpoint, see it go on, and cancel it again.
            at_cancel = points(page)
            page.click("#resume")
            expect(page.locator("#status")).to_have_text("running", timeout=60_000)
            wait_points(page, at_cancel + 2, 60)
            page.click("#cancel")
            expect(page.locator("#status")).to_have_text("cancelled", timeout=60_000)

            # Compare: both loss curves on one chart.
            page.goto(f"{ui.base}/compare?run=first&run=second")
            chart = page.locator("#chart-train")
            expect(chart).to_have_attribute("data-series", "2")
            expect(chart.locator(".u-legend")).to_contain_text("first")
            expect(chart.locator(".u-legend")).to_contain_text("second")

            # The runs table fits the page, long default names and paths included.
            old = old_run_with_a_default_name(runs_dir)
            for width in (1024, 1440):
                page.set_viewport_size({"width": width, "height": 900})
                page.goto(f"{ui.base}/")
                expect(page.locator("#runs-body tr")).to_have_count(3)
                page.screenshot(path=str(tmp_path / f"runs-{width}.png"), full_page=True)
                box = page.locator("table.runs").bounding_box()
                assert box["x"] >= 0 and box["x"] + box["width"] <= width, (width, box)

            # Delete that old run from its page (after the confirm dialog).
            page.goto(f"{ui.base}/runs/{old}")
            page.click("#delete")
            expect(page).to_have_url(f"{ui.base}/")
            expect(page.locator("#runs-body tr")).to_have_count(2)
            assert not (runs_dir / old).exists()
            browser.close()
    finally:
        ui.stop()
        kill_runs(runs_dir)
    statuses = {name: r["status"] for name, r in runs_list_cli(runs_dir).items()}
    assert statuses == {"first": "succeeded", "second": "cancelled"}
    assert not js_errors
