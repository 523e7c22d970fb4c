"""Run many ``longtune`` command lines cheaply, each in its own process.

``python -m longtune`` costs about two seconds of imports per call; the reliability tests run
dozens of command lines. :class:`CliServer` starts ONE Python process that imports longtune's
CLI (and torch, transformers) once, then forks a child per command line. Each child changes to
its working folder, points stdin at /dev/null and stdout / stderr at files, and calls
``longtune.cli.main(argv)`` — exactly what ``python -m longtune`` runs — with an uncaught
exception printed the way the interpreter prints it (``Traceback ...``, exit code 1). A child is
an ordinary process: a test can send it signals (``os.kill``) while it runs.

"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

_DRIVER = r"""
import json, os, sys, traceback
import torch, transformers  # noqa: F401  (imported once, before the forks)
import longtune.train.trainer  # noqa: F401
from longtune.cli import main

def child(case):
    code = 1
    try:
        os.chdir(case["cwd"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, case["out"]), (2, case["err"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        os.environ.update(case["env"])
        try:
            main(case["argv"])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

requests, replies = sys.stdin, sys.stdout
for line in requests:
    req = json.loads(line)
    if req["op"] == "start":
        pid = os.fork()
        if pid == 0:
            child(req)
        reply = {"pid": pid}
    elif req["op"] == "python":  # look at files only this process sees (a private mount)
        scope = {}
        exec(req["code"], scope)
        reply = {"value": scope.get("result")}
    else:
        _, status, usage = os.wait4(req["pid"], 0)
        reply = {"rc": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss}
    replies.write(json.dumps(reply) + "\n")
    replies.flush()
"""


@dataclass
class CliResult:
    """What one command line did."""

    argv: list[str]
    rc: int
    stdout: str
    stderr: str
    maxrss_mb: float

    def error_line(self) -> str:
        """The single stderr line of a clean failure (asserts it is one line, no traceback)."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        assert self.rc == 2, (self.argv, self.rc, self.stderr[-3000:])
        assert "Traceback" not in self.stderr, self.stderr[-3000:]
        assert len(lines) == 1, lines
        return lines[0]


def cli_env() -> dict[str, str]:
    """The environment of a user's shell, without torchrun's variables, offline for the Hub."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


class CliServer:
    """A process that forks a ``longtune`` command line per :meth:`start` (see module doc).

    Use as a context manager. ``start`` returns the child's pid at once; ``wait`` collects it.
    """

    def __init__(self, prefix: list[str] | None = None) -> None:
        """Start the server; ``prefix`` runs it under another command (e.g. ``unshare``)."""
        self._tmp = tempfile.TemporaryDirectory(prefix="cli-")
        self.dir = Path(self._tmp.name)
        (self.dir / "driver.py").write_text(_DRIVER)
        self._n = 0
        self._cases: dict[int, dict] = {}
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, str(self.dir / "driver.py")],
            env=cli_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )

    def __enter__(self) -> CliServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for pid in list(self._cases):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._tmp.cleanup()

    def _ask(self, request: dict, timeout: float) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"no answer to {request} within {timeout} s")
        line = self.proc.stdout.readline()
        assert line, "the CLI server died"
        return json.loads(line)

    def start(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> int:
        """Fork ``longtune ARGV`` in folder ``cwd``; returns its pid."""
        self._n += 1
        case = {
            "op": "start",
            "argv": [str(a) for a in argv],
            "cwd": str(cwd),
            "env": env or {},
            "out": str(self.dir / f"{self._n}.out"),
            "err": str(self.dir / f"{self._n}.err"),
        }
        pid = self._ask(case, timeout=60)["pid"]
        self._cases[pid] = case
        return pid

    def wait(self, pid: int, timeout: float = 300) -> CliResult:
        """Wait for the child ``pid`` (SIGKILL after ``timeout`` seconds) and collect it."""
        try:
            reply = self._ask({"op": "wait", "pid": pid}, timeout)
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            reply = json.loads(self.proc.stdout.readline())  # type: ignore[union-attr]
        case = self._cases.pop(pid)
        return CliResult(
            argv=case["argv"],
            rc=reply["rc"],
            stdout=Path(case["out"]).read_text(errors="replace"),
            stderr=Path(case["err"]).read_text(errors="replace"),
            maxrss_mb=reply["maxrss_kb"] / 1024,
        )

    def python(self, code: str) -> object:
        """Run ``code`` in the server process (it sees the server's mounts); returns the
        JSON value it assigns to ``result``."""
        return self._ask({"op": "python", "code": code}, timeout=60)["value"]

    def run(self, argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> CliResult:
        """Start and wait."""
        return self.wait(self.start(argv, cwd, env))
