"""Test helpers for the web UI: the real `longtune ui` in a subprocess, plain HTTP requests."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
DEMO_DATA = ROOT / "longtune" / "demo" / "data"


def wait_for(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class UIServer:
    """`python -m longtune ui` on a free (or given) port, its login link read from stdout."""

    def __init__(
        self,
        runs_dir: Path,
        allow: list[Path],
        port: int = 0,
        env: dict | None = None,
        host: str | None = None,
    ) -> None:
        self.runs_dir, self.allow, self.env = runs_dir, allow, env
        argv = [sys.executable, "-m", "longtune", "ui", "--port", str(port)]
        if host is not None:
            argv += ["--host", host]
        argv += ["--runs-dir", str(runs_dir)]
        for d in allow:
            argv += ["--allow-dir", str(d)]
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.output: list[str] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.output.append(line)
            if "/login?token=" in line:
                self.login_url = line.split("open ", 1)[1].strip()
                break
        if not hasattr(self, "login_url"):
            self.stop()
            raise AssertionError(f"longtune ui did not print a login link: {''.join(self.output)}")
        parts = urlsplit(self.login_url)
        self.base = f"{parts.scheme}://{parts.netloc}"
        self.host, self.port = parts.hostname, parts.port
        self.token = parts.query.split("token=", 1)[1]

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        token: bool = True,
        raw: bytes | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        """One HTTP request; JSON bodies in and out. Returns (status, headers, body)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        hdrs = {"Host": f"{self.host}:{self.port}"}
        if token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        conn.close()
        out_headers = {k.lower(): v for k, v in resp.getheaders()}
        if out_headers.get("content-type", "").startswith("application/json"):
            return resp.status, out_headers, json.loads(payload)
        return resp.status, out_headers, payload.decode("utf-8", errors="replace")

    def run(self, name: str) -> dict[str, Any]:
        status, _, body = self.request("GET", f"/api/runs/{name}")
        assert status == 200, body
        return body

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


def tiny_run_form(name: str, model_dir: Path, duration: str, /, **more: str) -> dict[str, str]:
    """A new-run form for a few fast steps of a tiny model on the demo data (context 128)."""
    form = {
        "name": name,
        "model": str(model_dir),
        "train": str(DEMO_DATA / "train.jsonl"),
        "eval": str(DEMO_DATA / "eval.jsonl"),
        "task_type": "chat",
        "context_length": "128",
        "duration": duration,
        "lr": "1e-3",
        "sp": "1",
        "nproc": "1",
        # The demo's examples are far longer than 128 tokens: train on context-length pieces.
        "extra": "--data.overlength=split --train.eval_batches=2 --model.activation_checkpointing=none",
    }
    form.update(more)
    return form


def runs_list_cli(runs_dir: Path) -> dict[str, dict[str, Any]]:
    """`longtune runs list --json` in a subprocess: name -> run."""
    out = subprocess.run(
        [sys.executable, "-m", "longtune", "runs", "list", "--runs-dir", str(runs_dir), "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {r["name"]: r for r in json.loads(out)}


def kill_runs(runs_dir: Path) -> None:
    """SIGKILL every run still going in ``runs_dir`` (a failed test leaves none behind)."""
    from longtune.run_dir import RunDir, read_launch, read_status

    if not runs_dir.is_dir():
        return
    for folder in runs_dir.iterdir():
        run = RunDir(folder)
        launch, status = read_launch(run) or {}, read_status(run) or {}
        groups = {launch.get("pgid") if launch.get("alive") else None}
        groups.add(status.get("pgid") if status.get("state") == "running" else None)
        for pgid in groups - {None}:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
