"""Where the live job page (:mod:`imgtasks.jobpage`) is served, always on loopback.

- A scheduler running in this process (the local clusters, ``Client(imgtasks.local_cluster())``):
  a page of its Dask dashboard, ``<dashboard>/imgtasks``, with an "Imgtasks" entry in the
  dashboard's navigation bar. distributed has no public API for either: the page is a bokeh
  application added to the scheduler's ``http_application`` exactly as
  ``distributed.dashboard.scheduler.connect`` adds the dashboard's own (``BokehApplication``
  of ``distributed.dashboard.core``), and the menu entry is appended to the ``pages`` list of
  ``distributed.dashboard.scheduler.template_variables(scheduler)``, which every dashboard
  page renders its navigation bar from. The page reads the client's figures directly.
- Any other scheduler (remote, or none: ``cluster="sync"``): the client serves the same
  page with a bokeh server of its own on 127.0.0.1 (``DEFAULT_ADDRESS``; a taken port moves
  to a free one), in a thread, with the dashboard's template, theme and static files.

One page per dashboard (or per client), reused by every job run on it: it shows the
current job, and the last one's final figures after it ends.

With :mod:`imgtasks.flow` and :mod:`imgtasks.cluster`, a module that imports dask.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import os
import socket
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tornado.ioloop import IOLoop
from tornado.web import StaticFileHandler

from imgtasks import cluster as clusters
from imgtasks.jobfeed import JobFeed

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "127.0.0.1:8790"
PATH = "/imgtasks"  # on the Dask dashboard, or on the client's own page server
MENU_ENTRY = PATH.strip("/")
IFRAME_HEIGHT = 1000


@dataclass
class JobPageLink:
    """A served job page: its URL, the feed it shows now, and (in Jupyter) the page inline."""

    url: str
    feed: JobFeed | None = None
    server: PageServer | None = field(default=None, repr=False)  # a page server of our own

    def current(self) -> JobFeed | None:
        return self.feed

    def iframe(self, width: str | int = "100%", height: int = IFRAME_HEIGHT) -> Any:
        """The page in a notebook cell (``IPython.display.IFrame``)."""
        from IPython.display import IFrame

        return IFrame(self.url, width=width, height=height)

    def _repr_html_(self) -> str:
        return (
            f'<iframe src="{self.url}" width="100%" height="{IFRAME_HEIGHT}" '
            'style="border: none"></iframe>'
        )

    def close(self) -> None:
        """Stop the page server of our own, if any (a dashboard page goes with its cluster)."""
        if self.server is not None:
            self.server.stop()
            self.server = None


# Pages already served: by scheduler (a dashboard page) or by client (a server of our own).
_PAGES: weakref.WeakKeyDictionary[Any, JobPageLink] = weakref.WeakKeyDictionary()


def job_page(client: Any = None, address: str = DEFAULT_ADDRESS) -> JobPageLink:
    """The job page of ``client``'s cluster (default: the default client), served from now
    on; in Jupyter, the cell shows it inline. ``imgtasks.thumbnails(..., client=client)``
    then draws its job there. On one of our local clusters this also loads the dashboard
    the page lives on (otherwise loaded when a page of it is first asked for).

    ``address``: where the client's own page server listens when the scheduler is not in
    this process (loopback only; a taken port moves to a free one).
    """
    if client is None:
        from distributed import default_client

        client = default_client()
    page = serve(client, address)
    late = clusters.late_dashboard(local_scheduler(client))
    if late is not None:  # asked for to be looked at: load the dashboard now
        late.start()
    return page


def serve(client: Any, address: str = DEFAULT_ADDRESS) -> JobPageLink:
    """The page for ``client`` (None: no cluster), started on first use."""
    check_loopback(address)
    scheduler = local_scheduler(client)
    key = scheduler if scheduler is not None else client
    page = _PAGES.get(key) if key is not None else None
    if page is None or (page.server is not None and not page.server.running):
        if scheduler is not None:
            page = on_dashboard(scheduler, client.dashboard_link)
        else:
            page = JobPageLink("")
            page.server = PageServer(address, page.current)
            page.url = page.server.start()
        if key is not None:
            _PAGES[key] = page
    return page


def check_loopback(address: str) -> None:
    host = split_address(address)[0]
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"the job page binds loopback only (127.0.0.1:PORT), got {address!r}")


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    try:
        return host.strip("[]") or "127.0.0.1", int(port or 0)
    except ValueError:
        raise ValueError(f"job page address must be HOST:PORT, got {address!r}") from None


def local_scheduler(client: Any) -> Any:
    """The scheduler object, when it runs in this process with a dashboard; else None."""
    from distributed import Scheduler

    scheduler = getattr(getattr(client, "cluster", None), "scheduler", None)
    if not isinstance(scheduler, Scheduler) or getattr(scheduler, "http_server", None) is None:
        return None
    try:  # no dashboard (dashboard_address=None): no link, or no bokeh application
        link = client.dashboard_link
        dashboards = getattr(scheduler.http_application, "applications", [])
    except Exception:
        return None
    coming = clusters.late_dashboard(scheduler) is not None
    return scheduler if link and (dashboards or coming) else None


# --- a page of the Dask dashboard ---------------------------------------------------------


def on_dashboard(scheduler: Any, dashboard_link: str) -> JobPageLink:
    """Add the page (and its menu entry) to the dashboard of a scheduler in this process;
    to one of our local clusters once its dashboard is attached (``LateDashboard``)."""
    base = dashboard_link.rsplit("/", 1)[0]
    page = JobPageLink(base + PATH)
    prefix = "/" + base.split("://", 1)[-1].partition("/")[2]
    late = clusters.late_dashboard(scheduler)
    if late is None:
        _add_page(scheduler, page, prefix)
    else:
        late.then(functools.partial(_add_page, scheduler, page, prefix))
    return page


def _add_page(scheduler: Any, page: JobPageLink, prefix: str) -> None:
    """Import the page's modules here, off the loop (bokeh: ~0.1 s more), then add it on
    the loop."""
    from distributed.utils import sync

    from imgtasks.jobpage import add_job_page

    sync(scheduler.loop, _add_to_dashboard, scheduler, page, prefix, add_job_page)


async def _add_to_dashboard(
    scheduler: Any, page: JobPageLink, prefix: str, add_job_page: Callable[..., None]
) -> None:
    from distributed.dashboard.components.scheduler import BOKEH_THEME, env
    from distributed.dashboard.core import BokehApplication
    from distributed.dashboard.scheduler import template_variables

    variables = template_variables(scheduler)  # memoized: the dict every page renders from

    def document(scheduler: Any, extra: dict, doc: Any) -> None:
        add_job_page(doc, page.current, env.get_template("simple.html"), extra, BOKEH_THEME)

    app = BokehApplication({PATH: document}, scheduler, prefix=prefix, template_variables=variables)
    scheduler.http_application.add_application(app)
    app.initialize(IOLoop.current())
    app.start()
    if MENU_ENTRY not in variables["pages"]:
        variables["pages"].append(MENU_ENTRY)


# --- a page server of the client's own --------------------------------------------------


class PageServer:
    """A bokeh server for the page alone, on loopback, in a thread with its own event loop."""

    def __init__(self, address: str, feed: Any) -> None:
        self.host, self.port = split_address(address)
        self.feed = feed
        self.loop: IOLoop | None = None
        self.thread: threading.Thread | None = None
        self.running = False

    def start(self, timeout: float = 30) -> str:
        port = self.port if port_free(self.host, self.port) else 0
        if port != self.port:
            log.info("job page: port %d taken; using a free one", self.port)
        ready = threading.Event()
        failure: list[BaseException] = []
        self.thread = threading.Thread(
            target=self._run, args=(port, ready, failure), name="imgtasks-job-page", daemon=True
        )
        self.thread.start()
        if not ready.wait(timeout) or failure:
            raise RuntimeError(f"the job page server did not start: {failure[:1]}")
        return f"http://{self.host}:{self.port}{PATH}"

    def _run(self, port: int, ready: threading.Event, failure: list[BaseException]) -> None:
        import asyncio

        from bokeh.application import Application
        from bokeh.application.handlers.function import FunctionHandler
        from bokeh.server.server import Server

        asyncio.set_event_loop(asyncio.new_event_loop())
        self.loop = IOLoop.current()
        try:
            port = port or free_port(self.host)
            server = Server(
                {PATH: Application(FunctionHandler(self._document))},
                io_loop=self.loop,
                address=self.host,
                port=port,
                allow_websocket_origin=[f"{self.host}:{port}", f"localhost:{port}"],
                extra_patterns=[(r"/statics/(.*)", StaticFileHandler, {"path": statics()})],
                use_index=False,
            )
            server.start()
        except BaseException as exc:
            failure.append(exc)
            ready.set()
            return
        self.port, self.running = port, True
        ready.set()
        try:
            self.loop.start()
        finally:
            server.stop()
            self.running = False

    def _document(self, doc: Any) -> None:
        from distributed.dashboard.components.scheduler import BOKEH_THEME, env

        from imgtasks.jobpage import add_job_page

        variables = {"pages": [MENU_ENTRY], "plots": [], "jupyter": False, "prefix": "/"}
        add_job_page(doc, self.feed, env.get_template("simple.html"), variables, BOKEH_THEME)

    def stop(self) -> None:
        if self.loop is not None and self.running:
            self.loop.add_callback(self.loop.stop)
        if self.thread is not None:
            self.thread.join(timeout=10)


def statics() -> str:
    import distributed.http

    return os.path.join(os.path.dirname(distributed.http.__file__), "static")


def port_free(host: str, port: int) -> bool:
    if port == 0:
        return False
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def showing(page: JobPageLink, feed: JobFeed) -> Any:
    """Show ``feed`` on ``page`` for the duration of a job; the final figures stay."""
    page.feed = feed
    try:
        yield page
    finally:
        feed.finish()
