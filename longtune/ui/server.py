"""``longtune ui``: bind, print the login link, serve until interrupted.

The socket is bound before anything is printed (so ``--port 0`` prints the port it got), the
access token is new at every start, and launched runs live in their own sessions: stopping the
UI (Ctrl-C, SIGTERM) leaves them running, and the next UI finds them in the runs folder.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from pathlib import Path

import uvicorn

from longtune.ui.app import create_app
from longtune.ui.forms import allowed_dirs
from longtune.ui.security import LOGIN_PATH, Settings


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost``.

    Args:
        host: an address or name.

    Returns:
        True when only this machine can reach it.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 when ``host`` is an IPv6 address).

    Args:
        host: the address.
        port: the port (0: any free one).

    Returns:
        The socket.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


def serve(
    host: str = "127.0.0.1",
    port: int = 8600,
    runs_dir: str | Path = "runs",
    allow_dirs: list[str] | None = None,
) -> int:
    """Serve the UI until interrupted.

    Args:
        host: the address to listen on (a non-loopback one prints a warning).
        port: the port (0: any free one).
        runs_dir: the runs folder (created if missing).
        allow_dirs: folders models and data may be read from (default: the current folder);
            the runs folder and the demo's assets are always allowed.

    Returns:
        The exit code.
    """
    runs_path = Path(runs_dir).resolve()
    runs_path.mkdir(parents=True, exist_ok=True)
    missing = [d for d in allow_dirs or [] if not Path(d).expanduser().is_dir()]
    if missing:
        print(
            f"longtune ui: error: --allow-dir {', '.join(missing)}: no such folder", file=sys.stderr
        )
        return 2
    allowed = allowed_dirs(runs_path, [Path(d) for d in allow_dirs] if allow_dirs else None)
    try:
        sock = bind(host, port)
    except OSError as e:
        print(
            f"longtune ui: error: cannot listen on {host}:{port}: {e.strerror}; "
            "choose another --port (or --port 0 for any free one)",
            file=sys.stderr,
        )
        return 2
    actual_port = sock.getsockname()[1]
    # Reached from other machines, the UI may be addressed by this host's full DNS name too.
    names = () if is_loopback(host) else (socket.getfqdn(),)
    settings = Settings(runs_dir=runs_path, allow_dirs=allowed, port=actual_port, host_names=names)
    app = create_app(settings)
    shown = host
    if host in ("0.0.0.0", "::"):
        shown = "127.0.0.1" if host == "0.0.0.0" else "::1"
    if ":" in shown:
        shown = f"[{shown}]"
    if not is_loopback(host):
        print(
            f"longtune ui: WARNING: listening on {host}, reachable from other machines; anyone "
            "who gets the login link can start and cancel runs here. Use --host 127.0.0.1 "
            "unless you mean it.",
            file=sys.stderr,
        )
    print(f"longtune ui: runs in {runs_path}", flush=True)
    print(f"  models and data from: {', '.join(str(p) for p in allowed)}", flush=True)
    print(f"  open http://{shown}:{actual_port}{LOGIN_PATH}?token={settings.token}", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
