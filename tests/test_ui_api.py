"""The web UI's API against the real `longtune ui` process: its guard (token, Host, origin),
path limits, the config's own errors, the data preview, and runs launched through it that fail
in preflight or are killed with SIGKILL."""

from __future__ import annotations

import json
import os
import re
import signal
from urllib.parse import quote

import pytest
import yaml
from ui_server import DEMO_DATA, UIServer, kill_runs, runs_list_cli, tiny_run_form, wait_for

from longtune.data import check_data
from longtune.run_dir import RunDir, mark_run, write_status
from longtune.train.config import ConfigError, config_from_values


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


def test_launch_failing_in_preflight_shows_its_one_line_error(env):
    ui, model = env["server"], env["model"]
    bad = env["models"] / "bad-launch.jsonl"
    good_line = (DEMO_DATA / "eval.jsonl").read_text().splitlines()[0]
    bad.write_text(
        good_line + "\n" + json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n"
    )
    status, _, run = ui.request(
        "POST", "/api/runs", body=tiny_run_form("bad", model, "2st", train=str(bad), eval="")
    )
    assert status == 201 and run["name"] == "bad", run
    assert ui.request("POST", "/api/runs", body=tiny_run_form("bad", model, "2st"))[0] == 409
    info = wait_for(
        lambda: (r := ui.run("bad"))["state"] == "failed" and r, 90, "the launch to fail"
    )
    assert f"{bad}:2: last-not-assistant" in info["error"] and "\n" not in info["error"]
    assert runs_list_cli(ui.runs_dir)["bad"]["status"] == "failed (data error)"


def test_kill9_of_a_run_shows_failed_process_gone_then_it_resumes(env):
    ui, model = env["server"], env["model"]
    form = tiny_run_form("killed", model, "5000st")
    form["extra"] += " --checkpoint.every=2"
    assert ui.request("POST", "/api/runs", body=form)[0] == 201
    wait_for(lambda: (ui.run("killed")["step"] or 0) >= 3, 120, "the run's third step")
    pgid = ui.run("killed")["pgid"]
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
