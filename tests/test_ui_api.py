"""The web UI's API against the real `longtune ui` process: its guard (token, Host, origin),
path limits (links resolved, every file of a data folder), the config's own errors, the
trainer's preflight before a launch creates anything, the data preview, deleting runs, what a
run page offers and says (no Resume that would fail again, the UI's words, the ETA), error
pages, and a run launched through it that is killed with SIGKILL."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from urllib.parse import quote

import pytest
import yaml
from ui_server import DEMO_DATA, UIServer, kill_runs, runs_list_cli, tiny_run_form, wait_for

from longtune.data import check_data
from longtune.run_dir import RunDir, mark_run, read_status, write_status
from longtune.train.config import ConfigError, config_from_values
from longtune.train.preflight import preflight
from longtune.ui.forms import FormError, defaults, parse_form

# A process that records a run as `running` (itself) and stays alive: a live run for the UI.
RUNNING = (
    "import sys, time; from longtune.run_dir import RunDir, write_status; "
    "write_status(RunDir(sys.argv[1]), 'running', step=int(sys.argv[2]), total_steps=10, "
    "started_at=time.time()); time.sleep(120)"
)


@pytest.fixture(scope="module")
def env(tmp_path_factory, ui_assets):
    base = tmp_path_factory.mktemp("ui_api")
    models = base / "models"
    models.mkdir()
    model = ui_assets["model"]
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text("{}\n")
    (models / "sneaky").symlink_to(outside)  # inside the allowed folder, pointing out of it
    cache = ui_assets["cache"]
    server = UIServer(
        base / "runs", allow=[models, ui_assets["models"]], env={"LONGTUNE_CACHE": str(cache)}
    )
    yield {"server": server, "model": model, "models": models, "outside": outside, "cache": cache}
    server.stop()
    kill_runs(server.runs_dir)


def fake_run(runs_dir, name: str, state: str, **status) -> RunDir:
    """A marked run folder with a config and a status, as the trainer leaves them."""
    run = RunDir(runs_dir / name)
    run.path.mkdir(parents=True)
    mark_run(run)
    config = {"model": {"path": "/models/m"}, "data": {"train": ["/data/a.jsonl"]}}
    run.config.write_text(yaml.safe_dump(config))
    write_status(run, state, **status)
    return run


@contextlib.contextmanager
def live_run(runs_dir, name: str, step: int = 4):
    """A run whose status is `running`, written by a live process (ended on exit)."""
    run = fake_run(runs_dir, name, "cancelled")
    proc = subprocess.Popen([sys.executable, "-c", RUNNING, str(run.path), str(step)])
    try:
        wait_for(lambda: (read_status(run) or {}).get("state") == "running", 30, "running")
        yield run
    finally:
        proc.kill()
        proc.wait()


def config_error(key: str, value: str) -> str:
    """The config module's own message for a setting (as the Python API gets it)."""
    with pytest.raises(ConfigError) as e:
        config_from_values({"model.path": "m", "data.train": ["d.jsonl"], key: value})
    return str(e.value)


def test_every_route_needs_the_token_and_the_login_link_sets_a_strict_cookie(env):
    ui = env["server"]
    for method, path in (("GET", "/"), ("GET", "/api/runs"), ("GET", "/static/app.js")):
        assert ui.request(method, path, token=False)[0] == 401, path
    assert ui.request("POST", "/api/runs", body={}, token=False)[0] == 401
    wrong = {"Authorization": "Bearer not-the-token"}
    assert ui.request("GET", "/api/runs", token=False, headers=wrong)[0] == 401
    assert ui.request("GET", "/login?token=nope", token=False)[0] == 401

    status, headers, _ = ui.request("GET", f"/login?token={ui.token}", token=False)
    assert status == 303 and headers["location"] == "/"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    jar = {"Cookie": cookie.split(";")[0]}
    status, _, body = ui.request("GET", "/api/runs", token=False, headers=jar)
    assert status == 200 and "runs" in body


def test_a_foreign_host_header_is_refused(env):
    ui = env["server"]
    for host in ("evil.example", f"evil.example:{ui.port}", f"127.0.0.1.nip.example:{ui.port}"):
        status, _, body = ui.request("GET", "/api/runs", headers={"Host": host})
        assert status == 403 and "not this machine" in body["detail"], host
    for host in (f"localhost:{ui.port}", f"127.0.0.1:{ui.port}"):
        assert ui.request("GET", "/api/runs", headers={"Host": host})[0] == 200


def test_cross_origin_and_non_json_posts_are_refused_and_no_cors(env):
    ui, model = env["server"], env["model"]
    form = tiny_run_form("x", model, "2st", lr="-1")
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
    ):
        status, out_headers, body = ui.request("POST", "/api/runs", body=form, headers=headers)
        assert status == 403 and "refused" in body["detail"], headers
        assert "access-control-allow-origin" not in out_headers
    status, _, _ = ui.request(
        "POST",
        "/api/runs",
        raw=b"name=x",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 415
    status, headers, _ = ui.request(
        "OPTIONS",
        "/api/runs",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert status in (403, 405) and "access-control-allow-origin" not in headers
    # The same origin passes the guard (and then meets the config's check).
    same = {"Origin": ui.base, "Sec-Fetch-Site": "same-origin"}
    assert ui.request("POST", "/api/runs", body=form, headers=same)[0] == 422


def test_paths_outside_the_allowed_folders_are_refused(env):
    ui, model, outside = env["server"], env["model"], env["outside"]
    cases = {
        "model": str(outside),
        "train": str(outside / "secret.jsonl"),
        "eval": str(env["models"] / "sneaky" / "secret.jsonl"),  # a link out of the folder
    }
    for field, value in cases.items():
        form = tiny_run_form("x", model, "2st", **{field: value})
        for path in ("/api/runs", "/api/preview"):
            status, _, body = ui.request("POST", path, body=form)
            assert status == 400, (field, path, body)
            assert "is outside the folders this UI may read" in body["detail"]
            assert str(env["models"].resolve()) in body["detail"]  # names the allowed folders
    assert not (ui.runs_dir / "x").exists()


def test_bad_form_values_get_the_config_modules_own_error(env):
    ui, model = env["server"], env["model"]
    cases = [
        ({"lr": "-1"}, config_error("optim.lr", "-1")),
        ({"lr": "fast"}, config_error("optim.lr", "fast")),
        ({"task_type": "poem"}, config_error("data.task_type", "poem")),
        ({"duration": "3 weeks"}, config_error("train.duration", "3 weeks")),
        ({"extra": "--optim.warmup_steps=-2"}, config_error("optim.warmup_steps", "-2")),
    ]
    for fields, expected in cases:
        status, _, body = ui.request(
            "POST", "/api/runs", body=tiny_run_form("x", model, "2st", **fields)
        )
        assert (status, body["detail"]) == (422, expected), fields
    expected = "optim.lr (from argument optim.lr): '-1' is invalid; must be greater than 0"
    assert expected == cases[0][1]
    for fields, words in (
        ({"name": "../x"}, "run name '../x' is not valid"),
        ({"nproc": "0"}, "nproc: '0' is invalid"),
        ({"extra": "--output.dir=/tmp/elsewhere"}, "output.dir cannot be set"),
        ({"extra": "--resume /tmp/ckpt"}, "checkpoint.resume cannot be set"),
        ({"extra": "--optim.nope=1"}, "unknown key 'optim.nope'"),
    ):
        status, _, body = ui.request(
            "POST", "/api/runs", body=tiny_run_form("x", model, "2st", **fields)
        )
        assert status == 422 and words in body["detail"], (fields, body)
    assert not (ui.runs_dir / "x").exists()


def test_the_lora_rank_field_and_more_settings_set_model_lora(tmp_path):
    """The form's LoRA rank is model.lora.rank; the other model.lora keys go in More settings
    (checked here without the server: the form's translation is the whole of it)."""
    allowed = [tmp_path.resolve(), DEMO_DATA]
    extra = "--model.lora.alpha=8 --model.lora.targets attention --model.lora.train-embeddings"
    form = tiny_run_form("lora", tmp_path / "model", "2st", lora_rank="16", extra=extra)
    lora = parse_form(form, tmp_path / "runs", allowed).cfg.model.lora
    assert (lora.rank, lora.alpha, lora.train_embeddings) == (16, 8.0, True)
    assert lora.targets == ["q_proj", "k_proj", "v_proj", "o_proj"]
    full = parse_form(tiny_run_form("full", tmp_path, "2st"), tmp_path, allowed).cfg
    assert full.model.lora.rank == 0 and defaults()["lora_rank"] == "0"
    known = "rank, alpha, dropout, targets, rslora, train_embeddings"
    for fields, message in (
        ({"lora_rank": "-1"}, config_error("model.lora.rank", "-1")),
        (
            {"extra": "--model.lora.rank=8"},
            "--model.lora.rank: model.lora.rank cannot be set in more settings",
        ),
        (
            {"extra": "--model.lora.rnak=8"},
            f"--model.lora.rnak: unknown key 'model.lora.rnak' (known keys in model.lora: {known})",
        ),
    ):
        with pytest.raises(FormError) as e:
            parse_form(tiny_run_form("x", tmp_path, "2st", **fields), tmp_path, allowed)
        assert (e.value.status, str(e.value)) == (422, message), fields


def test_preview_reports_statistics_and_loss_masks(env):
    ui, model = env["server"], env["model"]
    form = tiny_run_form("p", model, "2st")
    status, _, body = ui.request("POST", "/api/preview", body=form)
    assert status == 200 and body["ok"], body
    ref = check_data(
        [str(DEMO_DATA / "train.jsonl"), str(DEMO_DATA / "eval.jsonl")],
        str(model),
        context_length=128,
        overlength="split",
        cache_dir=str(env["cache"] / "tokens"),
        preview=3,
    )
    assert body["files"] == [json.loads(json.dumps(vars(f))) for f in ref.stats.files]
    assert len(body["examples"]) == 3
    for got, want in zip(body["examples"], ref.examples, strict=True):
        assert got["source"] == want.source and got["target_tokens"] == want.target_tokens
        assert any(s["target"] for s in got["segments"]) and not got["segments"][0]["target"]
    bad = env["models"] / "bad.jsonl"
    good_line = (DEMO_DATA / "eval.jsonl").read_text().splitlines()[0]
    bad.write_text(good_line + "\n{not json\n")
    status, _, body = ui.request(
        "POST", "/api/preview", body=tiny_run_form("p", model, "2st", train=str(bad), eval="")
    )
    assert status == 200 and not body["ok"] and body["stage"] == "lines"
    assert body["errors"][0].startswith(f"{bad}:2: invalid-json")


def test_a_launch_runs_the_trainers_preflight_and_creates_nothing_it_refuses(env):
    """Each of these once made a run folder and a process that failed seconds later."""
    ui, model, models = env["server"], env["model"], env["models"]
    (models / "notes.csv").write_text("a,b\n1,2\n")
    bad = models / "bad-launch.jsonl"
    good_line = (DEMO_DATA / "eval.jsonl").read_text().splitlines()[0]
    last_user = json.dumps({"messages": [{"role": "user", "content": "q"}]})
    bad.write_text(good_line + "\n" + last_user + "\n")
    cases = {
        "no-data": ({"train": str(models / "nope.jsonl")}, "nope.jsonl does not exist"),
        "no-model": ({"model": str(models / "no-such-model")}, "no-such-model"),
        "sp-too-big": ({"sp": "2"}, "world"),  # SP 2 does not fit 1 process
        "not-data": ({"train": str(models / "notes.csv")}, "unsupported-file-type"),
        "bad-line": ({"train": str(bad), "eval": ""}, f"{bad}:2: last-not-assistant"),
    }
    for name, (fields, words) in cases.items():
        form = tiny_run_form(name, model, "2st", **fields)
        status, _, body = ui.request("POST", "/api/runs", body=form)
        assert status == 422, (name, body)
        assert words in body["detail"] and "\n" not in body["detail"], (name, body)
        # The very message `longtune train` prints for these settings (its preflight).
        new = parse_form(form, ui.runs_dir, [*(d.resolve() for d in ui.allow), DEMO_DATA])
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            preflight(new.cfg, world_size=new.nproc)
        assert body["detail"] == str(e.value), name
        assert not (ui.runs_dir / name).exists(), name
    assert not set(cases) & set(runs_list_cli(ui.runs_dir))


def test_every_file_of_a_data_folder_must_lie_in_the_allowed_folders(env):
    """A link inside an allowed data folder to a file outside it is refused by name, for the
    preview (which would show its text) and the launch (which would train on it)."""
    ui, model, models, outside = env["server"], env["model"], env["models"], env["outside"]
    folder = models / "linked-data"
    folder.mkdir()
    (folder / "a.jsonl").write_text((DEMO_DATA / "eval.jsonl").read_text())
    (folder / "b.jsonl").symlink_to(outside / "secret.jsonl")
    for field in ("train", "eval"):
        form = tiny_run_form("linked", model, "2st", **{field: str(folder)})
        for path in ("/api/preview", "/api/runs"):
            status, _, body = ui.request("POST", path, body=form)
            assert status == 400, (field, path, body)
            detail = body["detail"]
            assert f"{folder / 'b.jsonl'} leads to {(outside / 'secret.jsonl').resolve()}" in detail
            assert "outside the folders this UI may read" in detail and "{}" not in detail
    assert not (ui.runs_dir / "linked").exists()
    # Without the link the same folder is previewed.
    (folder / "b.jsonl").unlink()
    form = tiny_run_form("linked", model, "2st", train=str(folder), eval="")
    status, _, body = ui.request("POST", "/api/preview", body=form)
    assert status == 200 and body["ok"], body


def test_delete_removes_a_finished_run_and_refuses_a_running_one(env):
    ui = env["server"]
    fake_run(ui.runs_dir, "to-delete", "succeeded", step=2, total_steps=2)
    page = ui.request("GET", "/runs/to-delete")[2]
    assert re.search(r'<button id="delete"[^>]*>', page) and "hidden" not in re.search(
        r'<button id="delete"[^>]*>', page
    ).group(0)
    status, _, body = ui.request("POST", "/api/runs/to-delete/delete", body={})
    assert status == 200 and body["deleted"] == "to-delete", body
    assert not (ui.runs_dir / "to-delete").exists()
    assert ui.request("POST", "/api/runs/to-delete/delete", body={})[0] == 404
    with live_run(ui.runs_dir, "busy"):
        status, _, body = ui.request("POST", "/api/runs/busy/delete", body={})
        assert status == 409 and "'busy' is running; cancel it" in body["detail"], body
        assert (ui.runs_dir / "busy" / "config.yaml").is_file()
    (ui.runs_dir / "mine").mkdir()
    (ui.runs_dir / "mine" / "notes.txt").write_text("keep me")
    assert ui.request("POST", "/api/runs/mine/delete", body={})[0] == 404  # not a run
    assert (ui.runs_dir / "mine" / "notes.txt").read_text() == "keep me"


def test_no_resume_is_offered_for_a_run_that_would_fail_again(env):
    ui = env["server"]
    for reason in ("config error", "data error"):
        name = f"failed-{reason.split()[0]}"
        fake_run(ui.runs_dir, name, "failed", reason=reason, error="data.train: x does not exist")
        run = ui.run(name)
        assert f"stopped on a {reason}" in run["resume_refusal"]
        assert "start a new run" in run["resume_refusal"]
        assert f"longtune train {ui.runs_dir / name / 'config.yaml'}" in run["resume_refusal"]
        page = ui.request("GET", f"/runs/{name}")[2]
        assert re.search(r'<button id="resume"[^>]*hidden', page), name
        assert re.search(r'<div id="no-resume" class="note" >', page), name  # shown
        status, _, body = ui.request("POST", f"/api/runs/{name}/resume", body={})
        assert status == 409 and body["detail"] == run["resume_refusal"]
    fake_run(ui.runs_dir, "failed-nan", "failed", reason="nan", error="non-finite loss")
    assert ui.run("failed-nan")["resume_refusal"] is None
    page = ui.request("GET", "/runs/failed-nan")[2]
    assert not re.search(r'<button id="resume"[^>]*hidden', page)


def test_the_run_page_says_resume_in_the_uis_words(env):
    ui = env["server"]
    message = (
        "cancelled by SIGTERM after step 3 of 9; checkpoint /r/checkpoints/step-3; "
        "rerun the same command to resume"
    )
    fake_run(ui.runs_dir, "stopped", "cancelled", step=3, total_steps=9, message=message)
    run = ui.run("stopped")
    assert run["message"] == message  # the record as the trainer wrote it
    assert run["display"]["message"] == (
        "cancelled by SIGTERM after step 3 of 9; checkpoint /r/checkpoints/step-3; "
        "press Resume to continue"
    )
    page = ui.request("GET", "/runs/stopped")[2]
    assert "press Resume to continue" in page and "rerun the same command" not in page


def test_a_running_run_has_an_eta_from_its_average_step_time(env):
    ui = env["server"]
    with live_run(ui.runs_dir, "eta", step=4) as run:
        # 2 s a step after a slow first step (start-up), as the trainer's records say.
        records = [
            {"step": s, "kind": "train", "loss": 1.0, "elapsed_s": 8.0 + 2 * s}
            for s in (1, 2, 3, 4)
        ]
        run.metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
        got = ui.run("eta")
        assert got["state"] == "running" and got["total_steps"] == 10
        assert got["eta_s"] == pytest.approx(2.0 * (10 - 4))
        assert got["display"]["eta"] == "12s"
        assert got["train_time_s"] == 16.0 and got["display"]["train_time"] == "16s"
    assert ui.run("eta")["eta_s"] is None  # not running any more


def test_pages_answer_html_and_the_api_json(env):
    ui = env["server"]
    html = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    # No token, from a browser: a page that says how to log in (and gives no token away).
    status, headers, page = ui.request("GET", "/", token=False, headers=html)
    assert status == 401 and headers["content-type"].startswith("text/html")
    assert "Log in to longtune" in page and "login link" in page and "longtune ui" in page
    assert "works" in page and "until that UI stops" in page
    assert '<form method="get" action="/login">' in page and ui.token not in page
    status, _, page = ui.request("GET", "/login?token=wrong", token=False, headers=html)
    assert status == 401 and "not this UI" in page and ui.token not in page
    # The API, and clients that do not ask for HTML: JSON.
    for path, headers in (("/api/runs", html), ("/", {}), ("/api/runs", {})):
        status, out, body = ui.request("GET", path, token=False, headers=headers)
        assert status == 401 and out["content-type"] == "application/json", path
        assert "login link" in body["detail"]
    # A run that does not exist: a page that says so and links to the runs list.
    status, headers, page = ui.request("GET", "/runs/nosuch", headers=html)
    assert status == 404 and headers["content-type"].startswith("text/html")
    assert "No such run" in page and "There is no run &#39;nosuch&#39;" in page
    assert '<a href="/">See the runs list</a>' in page
    status, headers, body = ui.request("GET", "/api/runs/nosuch")
    assert status == 404 and "no run 'nosuch'" in body["detail"]


def test_kill9_of_a_run_shows_failed_process_gone_then_it_resumes(env):
    ui, model = env["server"], env["model"]
    form = tiny_run_form("killed", model, "5000st")
    form["extra"] += " --checkpoint.every=2"
    assert ui.request("POST", "/api/runs", body=form)[0] == 201
    status, _, body = ui.request("POST", "/api/runs", body=tiny_run_form("killed", model, "2st"))
    assert status == 409 and "exists already" in body["detail"]
    wait_for(lambda: (ui.run("killed")["step"] or 0) >= 3, 120, "the run's third step")
    pgid, first_start = ui.run("killed")["pgid"], ui.run("killed")["started_at"]
    os.killpg(pgid, signal.SIGKILL)
    status = wait_for(
        lambda: (s := runs_list_cli(ui.runs_dir)["killed"]["status"]).startswith("failed") and s,
        30,
        "the killed run to read as failed",
    )
    assert status == "failed (process gone)"
    page = ui.request("GET", f"/runs/{quote('killed')}")
    assert page[0] == 200 and "failed (process gone)" in page[2]

    # Resume: the same folder, from its newest complete checkpoint.
    status, _, run = ui.request("POST", "/api/runs/killed/resume", body={})
    assert status == 200 and run["status"] == "starting", run
    log = ui.runs_dir / "killed" / "train.log"
    pattern = re.compile(r"resumed from (\S+)/checkpoints/step-(\d+) at step (\d+)")
    resumed = wait_for(lambda: pattern.search(log.read_text()), 120, "the run to resume")
    assert resumed.group(1) == str(ui.runs_dir / "killed")
    assert int(resumed.group(2)) == int(resumed.group(3)) >= 2  # its newest complete checkpoint
    status, _, body = ui.request("POST", "/api/runs/killed/resume", body={})
    assert status == 409 and "only a cancelled or failed run can be resumed" in body["detail"]
    wait_for(lambda: ui.run("killed")["state"] == "running", 60, "the resumed run to run")
    resumed_run = ui.run("killed")
    assert resumed_run["started_at"] == first_start  # the run's first start, kept
    assert read_status(RunDir(ui.runs_dir / "killed"))["started_at"] > first_start
    assert ui.request("POST", "/api/runs/killed/cancel", body={})[0] == 200
    wait_for(lambda: ui.run("killed")["status"] == "cancelled", 60, "the cancel")


def test_listens_on_loopback_unless_told_and_then_warns(env, tmp_path):
    assert env["server"].host == "127.0.0.1"
    assert not any("WARNING" in line for line in env["server"].output)
    wide = UIServer(
        tmp_path / "runs", allow=[tmp_path], env={"LONGTUNE_CACHE": str(tmp_path)}, host="0.0.0.0"
    )
    try:
        warning = [line for line in wide.output if "WARNING" in line]
        assert warning and "listening on 0.0.0.0, reachable from other machines" in warning[0]
        assert wide.host == "127.0.0.1"  # the printed link still points at this machine
        assert wide.request("GET", "/api/runs")[0] == 200
    finally:
        wide.stop()


def test_untrusted_text_is_escaped_in_pages(env):
    ui = env["server"]
    run = RunDir(ui.runs_dir / "xss")
    run.path.mkdir(parents=True)
    mark_run(run)
    config = {"model": {"path": "<script>alert(1)</script>"}, "data": {"train": ["<img src=x>"]}}
    run.config.write_text(yaml.safe_dump(config))
    write_status(run, "failed", reason="error", error="<b>boom</b>")
    status, _, html = ui.request("GET", "/runs/xss")
    assert status == 200 and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script>alert" not in html and "<b>boom" not in html
    status, _, html = ui.request("GET", "/")
    assert status == 200 and "<script>alert" not in html and "<img src=x>" not in html
