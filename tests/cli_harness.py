"""Run many ``longtune`` command lines cheaply, each in its own process.

``python -m longtune`` costs about two seconds of imports per call; the error tests run a few
dozen command lines. :func:`run_cli_many` starts ONE Python process that imports longtune's
CLI (and torch, transformers) once, then forks a child per command line. Each child changes to
its working folder, points file descriptors 1 and 2 at files, and calls
``longtune.cli.main(argv)`` — exactly what ``python -m longtune`` runs — with an uncaught
exception printed the way the interpreter prints it (``Traceback ...``, exit code 1). The exit
code, stdout, stderr and the child's peak memory come back per command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

_DRIVER = r"""
import json, os, resource, sys, traceback
import torch, transformers  # noqa: F401  (imported once, before the forks)
from longtune.cli import main

cases = json.load(open(sys.argv[1]))
results = []
for i, case in enumerate(cases):
    out, err = case["out"], case["err"]
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(case["cwd"])
            for fd, path in ((1, out), (2, err)):
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
    _, status, usage = os.wait4(pid, 0)
    results.append({"rc": os.waitstatus_to_exitcode(status), "maxrss_kb": usage.ru_maxrss})
json.dump(results, open(sys.argv[2], "w"))
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


def run_cli_many(
    cases: list[tuple[list[str], Path]], env: dict[str, str] | None = None, timeout: int = 300
) -> list[CliResult]:
    """Run ``longtune ARGV`` in working folder ``cwd`` for each ``(argv, cwd)``, one process each.

    Args:
        cases: command lines (without the leading ``longtune``) and their working folders.
        env: extra environment variables for every command line.
        timeout: seconds for all of them together.

    Returns:
        One :class:`CliResult` per case, in order.
    """
    with tempfile.TemporaryDirectory(prefix="cli-") as tmp:
        tmp = Path(tmp)
        spec = [
            {
                "argv": list(argv),
                "cwd": str(cwd),
                "env": env or {},
                "out": str(tmp / f"{i}.out"),
                "err": str(tmp / f"{i}.err"),
            }
            for i, (argv, cwd) in enumerate(cases)
        ]
        (tmp / "cases.json").write_text(json.dumps(spec))
        (tmp / "driver.py").write_text(_DRIVER)
        done = subprocess.run(
            [sys.executable, str(tmp / "driver.py"), str(tmp / "cases.json"), str(tmp / "r.json")],
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        results = json.loads((tmp / "r.json").read_text())
        return [
            CliResult(
                argv=s["argv"],
                rc=r["rc"],
                stdout=Path(s["out"]).read_text(errors="replace"),
                stderr=Path(s["err"]).read_text(errors="replace"),
                maxrss_mb=r["maxrss_kb"] / 1024,
            )
            for s, r in zip(spec, results, strict=True)
        ]
