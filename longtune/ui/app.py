"""The web application: server-rendered pages, a small JSON API, and the guard in front of both.

Pages: ``/`` (runs), ``/new`` (new run), ``/runs/NAME`` (one run), ``/compare?run=A&run=B``.
API: ``GET /api/runs``, ``GET /api/runs/NAME``, ``GET /api/runs/NAME/metrics?cursor=C`` (the
records added since the cursor; the run page polls it), ``POST /api/runs`` (launch, after the
trainer's preflight), ``POST /api/runs/NAME/cancel``, ``POST /api/runs/NAME/resume``,
``POST /api/runs/NAME/delete``, ``POST /api/preview`` (``longtune validate`` on the form's data).

Errors: the API answers JSON (``{"detail": ...}``); a page answers an HTML page that says what
is wrong and where to go (a run that does not exist: a link to the runs list; no access token:
how to log in).

Everything a page shows is read from the run folders on each request (:mod:`longtune.runs`),
so a restarted UI shows what the last one did. This module imports the runs API, the run-folder
module, the config and the data checker, never the trainer (the launch's preflight is imported
by :func:`longtune.runs.launch` when a run is launched).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from longtune import runs
from longtune.run_dir import RunDir, RunLockedError, read_metrics_since
from longtune.ui.forms import (
    FormError,
    NewRun,
    check_data_files,
    defaults,
    parse_form,
    task_types,
)
from longtune.ui.security import (
    LOGIN_PATH,
    SAFE_METHODS,
    SECURITY_HEADERS,
    Settings,
    check_request,
    has_token,
)

HERE = Path(__file__).parent
PREVIEW_EXAMPLES = 3
MAX_PREVIEW_ERRORS = 50
#: The trainer's advice after a stop, in command-line words, and what a UI user does instead.
_CLI_RESUME = "rerun the same command to resume"
_UI_RESUME = "press Resume to continue"


def run_json(info: runs.RunInfo) -> dict[str, Any]:
    """A run for the browser: its fields plus display strings.

    Args:
        info: the run.

    Returns:
        JSON-safe dict with a ``display`` sub-dict.
    """
    out = info.to_json()
    check = info.export_check
    out["display"] = {
        "progress": runs.format_progress(info),
        "train_loss": runs.format_loss(info.train_loss),
        "eval_loss": runs.format_loss(info.eval_loss),
        "started": runs.format_time(info.started_at),
        "started_short": _short_time(info.started_at),
        "duration": _seconds(info.duration_s),
        "train_time": _seconds(info.train_time_s),
        "eta": _seconds(info.eta_s),
        "check": "-" if check is None else ("passed" if check.get("passed") else "failed"),
        "message": _for_the_ui(info.message),
        "error": _for_the_ui(info.error),
    }
    return out


def _seconds(value: float | None) -> str:
    return "-" if value is None else runs.format_duration(value)


def _for_the_ui(text: str | None) -> str | None:
    """The trainer's words for a command-line user, with the UI's way to resume."""
    return None if text is None else text.replace(_CLI_RESUME, _UI_RESUME)


def _short_time(timestamp: float | None) -> str:
    """``08:26:02`` today, ``11-27 08:26`` before."""
    if timestamp is None:
        return "-"
    then = time.localtime(timestamp)
    same_day = time.strftime("%Y%m%d", then) == time.strftime("%Y%m%d")
    return time.strftime("%H:%M:%S" if same_day else "%m-%d %H:%M", then)


def create_app(settings: Settings) -> FastAPI:
    """Build the application for one runs folder.

    Args:
        settings: runs folder, allowed folders, port and access token.

    Returns:
        The FastAPI app (serve it with uvicorn).
    """
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    _add_guard(app, settings, templates)
    _add_pages(app, settings, templates)
    _add_api(app, settings)

    @app.exception_handler(FormError)
    async def form_error(request: Request, exc: FormError) -> Response:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if _is_api(request.url.path):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        return _error_page(templates, request, exc.status_code, str(exc.detail))

    return app


def _is_api(path: str) -> bool:
    return path.startswith("/api/")


def _error_page(
    templates: Jinja2Templates, request: Request, status: int, detail: str, **context: Any
) -> Response:
    """An HTML page for a refused or failed page request: what is wrong, where to go."""
    context = {"page": "error.html", "status": status, "detail": detail, **context}
    return templates.TemplateResponse(request, "error.html", context, status_code=status)


def _add_guard(app: FastAPI, settings: Settings, templates: Jinja2Templates) -> None:
    """The security guard in front of every route (static files included)."""

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        refused = check_request(
            request.method, request.url.path, headers, dict(request.cookies), settings
        )
        if refused is not None:
            status, reason = refused
            browser = "text/html" in headers.get("accept", "")
            if browser and not _is_api(request.url.path) and request.method in SAFE_METHODS:
                # A person at a browser: say how to get in (the page needs no static file).
                response: Response = _error_page(
                    templates, request, status, reason, login=status == 401
                )
            else:
                response = JSONResponse({"detail": reason}, status_code=status)
        else:
            response = await call_next(request)
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response


def _add_pages(app: FastAPI, settings: Settings, templates: Jinja2Templates) -> None:
    """The login link and the server-rendered pages."""

    def page(request: Request, template: str, **context: Any) -> Response:
        return templates.TemplateResponse(request, template, {"page": template, **context})

    @app.get(LOGIN_PATH)
    def login(request: Request, token: str = "") -> Response:
        headers = {"authorization": f"Bearer {token}"}
        if not has_token(headers, {}, settings):
            reason = "wrong or missing token: it is not the one this UI printed when it started"
            if "text/html" in request.headers.get("accept", ""):
                return _error_page(templates, request, 401, reason, login=True)
            return JSONResponse({"detail": reason}, status_code=401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(
            settings.cookie, settings.token, httponly=True, samesite="strict", path="/"
        )
        return response

    @app.get("/")
    def runs_page(request: Request) -> Response:
        found = [run_json(r) for r in runs.list(settings.runs_dir)]
        return page(request, "runs.html", runs=found, runs_dir=str(settings.runs_dir))

    @app.get("/new")
    def new_page(request: Request) -> Response:
        form = defaults()
        return page(
            request,
            "new.html",
            form=form,
            model_ready=(Path(form["model"]) / "config.json").is_file(),
            task_types=task_types(),
            allowed=[str(p) for p in settings.allow_dirs],
        )

    @app.get("/runs/{name}")
    def run_page(request: Request, name: str) -> Response:
        try:
            info = runs.get(name, settings.runs_dir)
        except (FileNotFoundError, ValueError):
            detail = f"There is no run {name!r} in {settings.runs_dir}."
            return _error_page(templates, request, 404, detail, missing_run=True)
        return page(request, "run.html", run=run_json(info))

    @app.get("/compare")
    def compare_page(
        request: Request, run: Annotated[list[str] | None, Query()] = None
    ) -> Response:
        found = [r.name for r in runs.list(settings.runs_dir)]
        chosen = [n for n in (run or []) if n in found]
        return page(request, "compare.html", names=found, chosen=chosen)


def _add_api(app: FastAPI, settings: Settings) -> None:
    """The JSON API the pages use (and scripts may, with the bearer token)."""

    @app.get("/api/runs")
    def api_runs() -> dict[str, Any]:
        return {"runs": [run_json(r) for r in runs.list(settings.runs_dir)]}

    @app.get("/api/runs/{name}")
    def api_run(name: str) -> dict[str, Any]:
        info = _get_run(settings, name)
        out = run_json(info)
        config = RunDir(info.path).config
        out["config_text"] = config.read_text() if config.is_file() else ""
        out["log_tail"] = runs.tail_log(info.path)
        out["launch_output"] = runs.launch_output(info.path, lines=15)
        return out

    @app.get("/api/runs/{name}/metrics")
    def api_metrics(name: str, cursor: str | None = None) -> dict[str, Any]:
        info = _get_run(settings, name)
        if cursor is not None and not _is_cursor(cursor):
            raise HTTPException(422, f"cursor {cursor!r} is not of the form INODE:OFFSET")
        records, new_cursor, reset = read_metrics_since(RunDir(info.path), cursor)
        return {"records": records, "cursor": new_cursor, "reset": reset, "state": info.state}

    @app.post("/api/runs", status_code=201)
    async def api_launch(request: Request) -> dict[str, Any]:
        new = parse_form(await _form(request), settings.runs_dir, settings.allow_dirs)
        # The preflight reads the model and every data line: seconds, off the event loop.
        info = await run_in_threadpool(_launch, new, settings.allow_dirs)
        return run_json(info)

    @app.post("/api/runs/{name}/cancel")
    def api_cancel(name: str) -> dict[str, Any]:
        _get_run(settings, name)
        try:
            return run_json(runs.cancel(name, settings.runs_dir))
        except ValueError as e:
            raise HTTPException(409, str(e)) from None

    @app.post("/api/runs/{name}/resume")
    def api_resume(name: str) -> dict[str, Any]:
        refusal = _get_run(settings, name).resume_refusal
        if refusal is not None:  # the UI offers no Resume for it; a script gets the reason
            raise HTTPException(409, refusal)
        try:
            return run_json(runs.resume(name, settings.runs_dir))
        except (ValueError, FileNotFoundError) as e:
            raise HTTPException(409, str(e)) from None

    @app.post("/api/runs/{name}/delete")
    def api_delete(name: str) -> dict[str, Any]:
        _get_run(settings, name)
        try:
            info = runs.delete(name, settings.runs_dir)
        except (ValueError, RunLockedError) as e:
            raise HTTPException(409, str(e)) from None
        return {"deleted": info.name, "path": str(info.path)}

    @app.post("/api/preview")
    async def api_preview(request: Request) -> dict[str, Any]:
        form = await _form(request)
        form.setdefault("name", "preview")
        new = parse_form(form, settings.runs_dir, settings.allow_dirs)
        # seconds of work: off the event loop
        return await run_in_threadpool(_preview, new.cfg, settings.allow_dirs)


def _launch(new: NewRun, allowed: list[Path]) -> runs.RunInfo:
    """Launch a checked form's run: its data files inside ``allowed``, then the trainer's
    preflight (in :func:`longtune.runs.launch`; nothing is created when it refuses)."""
    check_data_files(new.cfg, allowed)
    try:
        return runs.launch(new.cfg, new.nproc)
    except FileExistsError as e:
        raise HTTPException(409, str(e)) from None
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        # ConfigError, DataValidationError, ParallelConfigError, ModelFolderError, ...
        raise FormError(422, str(e)) from None
    except OSError as e:  # a model or data file that cannot be read, a folder not created
        raise FormError(422, f"{e.filename or 'the run folder'}: {e.strerror or e}") from None


def _get_run(settings: Settings, name: str) -> runs.RunInfo:
    try:
        return runs.get(name, settings.runs_dir)
    except (FileNotFoundError, ValueError) as e:
        raise HTTPException(404, str(e)) from None


async def _form(request: Request) -> dict[str, Any]:
    try:
        form = await request.json()
    except ValueError:
        raise HTTPException(400, "the request body is not JSON") from None
    if not isinstance(form, dict):
        raise HTTPException(400, "the request body must be a JSON object of form fields")
    return form


def _is_cursor(text: str) -> bool:
    inode, colon, offset = text.partition(":")
    return (
        bool(colon)
        and inode.isascii()
        and inode.isdecimal()
        and offset.isascii()
        and offset.isdecimal()
    )


def _preview(cfg: Any, allowed: list[Path]) -> dict[str, Any]:
    """``longtune validate`` on the form's data, with a few examples and their loss mask."""
    from longtune.data import check_data  # imports torch: only when a preview is asked for

    check_data_files(cfg, allowed)
    if not (Path(cfg.model.path) / "config.json").is_file():
        raise FormError(
            422, f"model.path: {cfg.model.path} is not a Hugging Face model folder (no config.json)"
        )
    try:
        report = check_data(
            list(cfg.data.train) + list(cfg.data.eval),
            cfg.model.path,
            task_type=cfg.data.task_type,
            context_length=cfg.data.context_length,
            overlength=cfg.data.overlength,
            loss_on=cfg.data.loss_on,
            all_errors=True,
            cache_dir=cfg.data.cache_dir,
            preview=PREVIEW_EXAMPLES,
        )
    except (ValueError, OSError) as e:
        raise FormError(422, str(e)) from None
    stats = report.stats
    return {
        "ok": report.ok,
        "stage": report.stage,
        "errors": report.errors[:MAX_PREVIEW_ERRORS],
        "more_errors": max(0, len(report.errors) - MAX_PREVIEW_ERRORS),
        "files": [vars(f) for f in stats.files] if stats else [],
        "total": {k: v for k, v in vars(stats).items() if k != "files"} if stats else None,
        "examples": [
            {
                "source": e.source,
                "tokens": e.tokens,
                "target_tokens": e.target_tokens,
                "segments": [vars(s) for s in e.segments],
            }
            for e in report.examples
        ],
    }
