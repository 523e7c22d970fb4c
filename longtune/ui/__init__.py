"""The local web UI (``longtune ui``): start, watch, compare, cancel, resume and delete runs
from a browser.

``server.serve`` binds and prints the login link; ``app.create_app`` is the FastAPI application
(pages and a JSON API behind the guard of ``security``); ``forms`` turns the new-run form into a
validated config. The UI reads and starts runs only through :mod:`longtune.runs`,
:mod:`longtune.run_dir`, :mod:`longtune.train.config` and :func:`longtune.data.check_data`
(and the data paths' expansion); it never imports the trainer (a launch's preflight runs in
:func:`longtune.runs.launch`). Its assets (uPlot, styles, script) are served from ``static/``.
"""
