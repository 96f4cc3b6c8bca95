"""The live job page: a bokeh document drawn from a :class:`~imgtasks.jobfeed.JobFeed`.

Built like the Dask dashboard's own pages (``distributed.dashboard.components``): figures
titled in the plot, ``toolbar_location="above"`` with few tools, hover tooltips in the
dashboard's fonts, and the dashboard's theme and page template (navigation bar, CSS)
when :mod:`imgtasks.jobserver` passes them. Bokeh only: no dask, no new web framework.

    progress       images done / total, a bar
    counts         rows per status, as batches finish
    throughput     images/s and MB/s over time
    failing hosts / errors    the ten with most failures
    thumbnails     the newest rows, failures as labelled grey tiles (as on the contact sheet)
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from bokeh.document import Document
from bokeh.layouts import column, row
from bokeh.models import ColumnDataSource, DataTable, HoverTool, Range1d, TableColumn
from bokeh.plotting import figure
from PIL import Image

from imgtasks import contact_sheet as sheet
from imgtasks.jobfeed import RECENT_TILES, SAMPLES, JobFeed, JobFigures
from imgtasks.status import DOWNLOAD, FLOW, SOURCE, THUMBNAIL, Status

log = logging.getLogger(__name__)

TITLE = "Dask: imgtasks"
REFRESH_MS = 500  # figures: the dashboard refreshes its own at 100-500 ms
TILES_EVERY = 4  # thumbnails: every 4th refresh (2 s) at most, and only when a batch finished
COLUMNS = 8
TABLE_HEIGHT = 280  # the header and ten rows of 25 px: the top hosts and errors
MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}
# Colours per stage, so a glance says where failures come from (ok: the dashboard's green).
STAGE_COLOURS = {
    "ok": "#2ca02c",
    "source": "#bcbd22",
    "download": "#d62728",
    "thumbnail": "#ff7f0e",
    "flow": "#7f7f7f",
}
# One colour per charted host (Category10 without the stages' green and red).
HOST_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
TOOLTIP = (
    '<div><span style="font-size: 12px; font-weight: bold;">{label}:</span>&nbsp;'
    '<span style="font-size: 10px; font-family: Monaco, monospace;">{value}</span></div>'
)


def status_colour(status: str) -> str:
    if status == Status.OK:
        return STAGE_COLOURS["ok"]
    for stage, statuses in (("source", SOURCE), ("thumbnail", THUMBNAIL), ("flow", FLOW)):
        if status in statuses:
            return STAGE_COLOURS[stage]
    return STAGE_COLOURS["download" if status in DOWNLOAD else "flow"]


def hex_colour(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def source(name: str, data: dict) -> ColumnDataSource:
    return ColumnDataSource(data, name=f"imgtasks-{name}-data")


def top_table(
    data: ColumnDataSource, name: str, key: tuple[str, str], count: tuple[str, str]
) -> DataTable:
    """A table of the ten with most failures: (field, title) of the name and of the count."""
    return DataTable(
        source=data,
        name=f"imgtasks-{name}",
        height=TABLE_HEIGHT,
        sizing_mode="stretch_width",
        columns=[
            TableColumn(field=key[0], title=key[1]),
            TableColumn(field=count[0], title=count[1], width=80),
        ],
        index_position=None,
    )


def tooltip(*pairs: tuple[str, str]) -> str:
    return "".join(TOOLTIP.format(label=label, value=value) for label, value in pairs)


@dataclass(frozen=True)
class TileGlyphs:
    """The grid's columns: pictures (data URLs, placed and sized) and every cell's frame."""

    pictures: dict[str, list]
    cells: dict[str, list]


def tile_glyphs(tiles: Sequence[sheet.Tile], slots: int = RECENT_TILES) -> TileGlyphs:
    """Tiles on the contact sheet's geometry, newest first; a thumbnail is centred in its box
    (its size read from its header, never decoded), a failure is a grey tile saying why."""
    pictures: dict[str, list] = {k: [] for k in ("url", "x", "y", "w", "h")}
    cells: dict[str, list] = {
        k: [] for k in ("x", "y", "w", "h", "fill", "text", "label", "label_y", "index", "status")
    }
    tile_w, tile_h = sheet.TILE_SIZE
    for position, tile in enumerate(tiles[:slots]):
        left, top, right, bottom = sheet.tile_box(position, slots, columns=COLUMNS)
        shown = _picture(tile.image)
        if shown is not None:
            url, (w, h) = shown
            pictures["url"].append(url)
            pictures["x"].append(left + (tile_w - w) / 2)
            pictures["y"].append(top + (tile_h - h) / 2)
            pictures["w"].append(w)
            pictures["h"].append(h)
            text, fill = "", sheet.BACKGROUND
            label = f"#{tile.index}" if tile.status == Status.OK else f"#{tile.index} {tile.status}"
        else:
            missing = sheet.MISSING if tile.status in sheet.SHOWN_WITH_IMAGE else tile.status
            text = sheet.UNREADABLE if tile.image else missing
            fill, label = sheet.FAILED_GREY, f"#{tile.index}"
        cells["x"].append((left + right) / 2)
        cells["y"].append((top + bottom) / 2)
        cells["w"].append(tile_w)
        cells["h"].append(tile_h)
        cells["fill"].append(hex_colour(fill))
        cells["text"].append(text)
        cells["label"].append(label)
        cells["label_y"].append(bottom + sheet.LABEL_HEIGHT / 2)
        cells["index"].append(tile.index)
        cells["status"].append(tile.status)
    return TileGlyphs(pictures, cells)


def _picture(data: bytes | None) -> tuple[str, tuple[int, int]] | None:
    """A data URL for the browser to decode, and the size to draw it at (fit in the tile)."""
    if not data or len(data) > sheet.MAX_TILE_BYTES:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:  # the header only
            mime, (w, h) = MIME.get(im.format or ""), im.size
    except Exception:
        return None
    if mime is None or w < 1 or h < 1:
        return None
    scale = min(1.0, sheet.TILE_SIZE[0] / w, sheet.TILE_SIZE[1] / h)
    encoded = base64.b64encode(data).decode("ascii")
    return f"data:{mime};base64,{encoded}", (round(w * scale), round(h * scale))


class JobPage:
    """The figures of one browser session, refreshed from the feed by ``update``."""

    def __init__(self, feed: Callable[[], JobFeed | None]) -> None:
        self.feed = feed  # the current job's feed (a dashboard page outlives a job)
        self.shown = -1  # figures' version on screen
        self.tiles_shown = -1
        self.ticks = 0
        self.last_rate_t = -1.0
        # Named, so a test (or a curious user) finds them: Bokeh.documents[0].get_model_by_name
        self.progress = source("progress", {"done": [0.0], "total": [1.0], "text": ["waiting"]})
        self.counts = source("counts", {"status": [], "n": [], "colour": []})
        self.rates = source("rates", {"t": [], "images_per_s": [], "mb_per_s": []})
        self.hosts = source("hosts", {"host": [], "n": []})
        self.limits = source("host-limits", {"xs": [], "ys": [], "host": [], "colour": []})
        self.errors = source("errors", {"error": [], "n": []})
        glyphs = tile_glyphs([])
        self.pictures = source("pictures", glyphs.pictures)
        self.cells = source("cells", glyphs.cells)
        self.root = self._layout()

    def _layout(self) -> Any:
        progress = figure(
            title="Images done / total",
            name="imgtasks-progress",
            height=90,
            x_range=Range1d(0, 1),
            y_range=Range1d(0, 1),
            tools="",
            toolbar_location="above",
            sizing_mode="stretch_width",
        )
        bar = {"left": 0, "bottom": 0.15, "top": 0.85, "source": self.progress}
        progress.quad(
            right="total", fill_color="#aaaaaa", fill_alpha=0.2, line_color="#aaaaaa", **bar
        )
        progress.quad(
            right="done", fill_color=STAGE_COLOURS["ok"], fill_alpha=0.8, line_alpha=0, **bar
        )
        progress.text(
            x=0.01,
            y=0.5,
            text="text",
            source=self.progress,
            text_baseline="middle",
            text_font_size="13px",
        )
        progress.axis.visible = progress.grid.visible = False

        counts = figure(
            title="Rows per status",
            name="imgtasks-counts",
            height=260,
            y_range=[],
            tools="",
            toolbar_location="above",
            sizing_mode="stretch_width",
        )
        counts.hbar(y="status", right="n", height=0.7, color="colour", source=self.counts)
        counts.add_tools(HoverTool(tooltips=tooltip(("status", "@status"), ("rows", "@n"))))
        counts.x_range.start = 0
        self.statuses = counts.y_range  # kept: finding it again walks every model (~50 ms)

        rates = figure(
            title="Throughput (images/s, MB/s)",
            name="imgtasks-throughput",
            height=260,
            tools="pan,wheel_zoom,reset",
            toolbar_location="above",
            sizing_mode="stretch_width",
            x_axis_label="seconds",
        )
        for field, colour, label in (
            ("images_per_s", "#1f77b4", "images/s"),
            ("mb_per_s", "#9467bd", "MB/s"),
        ):
            rates.line(
                x="t", y=field, source=self.rates, color=colour, legend_label=label, line_width=2
            )
        rates.legend.location = "top_left"
        rates.y_range.start = 0

        hosts = top_table(self.hosts, "hosts", ("host", "failing host"), ("n", "failures"))
        errors = top_table(self.errors, "errors", ("error", "failure"), ("n", "rows"))
        return column(
            progress,
            row(counts, rates, sizing_mode="stretch_width"),
            self._host_limits(),
            row(hosts, errors, sizing_mode="stretch_width"),
            self._thumbnails(),
            sizing_mode="stretch_width",
            name="imgtasks",
        )

    def _host_limits(self) -> Any:
        """Each host's adaptive concurrency limit over time, as the I/O worker that
        fetched a batch saw it at the batch's end (the hosts with the highest limits)."""
        limits = figure(
            title="Requests at once per host: the adaptive limit (top hosts)",
            name="imgtasks-host-limits",
            height=220,
            tools="pan,wheel_zoom,reset",
            toolbar_location="above",
            sizing_mode="stretch_width",
            x_axis_label="seconds",
        )
        limits.multi_line(xs="xs", ys="ys", line_color="colour", line_width=2, source=self.limits)
        limits.add_tools(HoverTool(tooltips=tooltip(("host", "@host"))))
        limits.y_range.start = 0
        return limits

    def _thumbnails(self) -> Any:
        width, height = sheet.sheet_size(RECENT_TILES, columns=COLUMNS)
        grid = figure(
            title="Latest thumbnails (newest first)",
            name="imgtasks-thumbnails",
            width=width,
            height=height + 30,
            x_range=Range1d(0, width),
            y_range=Range1d(height, 0),
            tools="",
            toolbar_location="above",
            background_fill_color=hex_colour(sheet.BACKGROUND),
            min_border=0,
        )
        cells = grid.rect(
            x="x", y="y", width="w", height="h", fill_color="fill", line_alpha=0, source=self.cells
        )
        grid.image_url(
            url="url",
            x="x",
            y="y",
            w="w",
            h="h",
            anchor="top_left",
            source=self.pictures,
            name="imgtasks-pictures",
        )
        words = (
            ("y", "text", "12px", sheet.FAILED_TEXT),
            ("label_y", "label", "11px", sheet.LABEL_COLOUR),
        )
        for y, text, size, colour in words:  # a failure's status across it; its label below
            grid.text(
                x="x",
                y=y,
                text=text,
                source=self.cells,
                text_align="center",
                text_baseline="middle",
                text_font_size=size,
                text_color=hex_colour(colour),
            )
        grid.add_tools(
            HoverTool(renderers=[cells], tooltips=tooltip(("row", "@index"), ("status", "@status")))
        )
        grid.axis.visible = grid.grid.visible = False
        return grid

    async def update(self) -> None:
        """The periodic callback: redraw what changed; thumbnails read off the event loop."""
        feed = self.feed()
        if feed is None:
            return
        figures = feed.figures()
        self.show(figures)
        self.ticks += 1
        if figures.version != self.tiles_shown and (
            self.ticks % TILES_EVERY == 0 or figures.finished or self.tiles_shown < 0
        ):
            self.tiles_shown = figures.version
            tiles = await asyncio.to_thread(feed.recent_tiles)
            glyphs = await asyncio.to_thread(tile_glyphs, tiles)
            self.pictures.data = glyphs.pictures
            self.cells.data = glyphs.cells

    def show(self, figures: JobFigures) -> None:
        total = figures.total or max(figures.done, 1)
        self.progress.data = {
            "done": [figures.done / total],
            "total": [1.0],
            "text": [progress_text(figures)],
        }
        if figures.version == self.shown:
            return
        self.shown = figures.version
        ordered = sorted(figures.counts.items(), key=lambda kv: (-kv[1], kv[0]))
        self.counts.data = {
            "status": [s for s, _ in ordered],
            "n": [n for _, n in ordered],
            "colour": [status_colour(s) for s, _ in ordered],
        }
        self.statuses.factors = [s for s, _ in reversed(ordered)]
        # Only the new points go to the browser (a long job has thousands).
        new = [r for r in figures.rates if r.t > self.last_rate_t]
        if new:
            self.last_rate_t = new[-1].t
            self.rates.stream(
                {
                    "t": [r.t for r in new],
                    "images_per_s": [r.images_per_s for r in new],
                    "mb_per_s": [r.mb_per_s for r in new],
                },
                rollover=SAMPLES,
            )
        hosts, errors = figures.failed_hosts, figures.errors
        self.limits.data = host_limit_lines(figures)
        self.hosts.data = {"host": list(hosts), "n": list(hosts.values())}
        self.errors.data = {"error": list(errors), "n": list(errors.values())}


def host_limit_lines(figures: JobFigures) -> dict[str, list]:
    """The host-limit chart's columns: one line per host, a step at each point."""
    lines: dict[str, list] = {"xs": [], "ys": [], "host": [], "colour": []}
    for i, (host, points) in enumerate(sorted(figures.host_limits.items())):
        lines["xs"].append([p.t for p in points])
        lines["ys"].append([p.limit for p in points])
        lines["host"].append(host)
        lines["colour"].append(HOST_COLOURS[i % len(HOST_COLOURS)])
    return lines


def progress_text(figures: JobFigures) -> str:
    total = "?" if figures.total is None else f"{figures.total}"
    share = "" if figures.fraction is None else f" ({100 * figures.fraction:.0f} %)"
    state = "done" if figures.finished else "running"
    return (
        f"{figures.done} / {total} images{share}, {figures.ok} ok, {figures.failed} failed; "
        f"{figures.elapsed_s:.0f} s, {state}"
    )


def add_job_page(
    doc: Document,
    feed: Callable[[], JobFeed | None],
    template: Any = None,
    template_variables: dict | None = None,
    theme: Any = None,
) -> JobPage:
    """Fill ``doc`` (one browser session) with the page, refreshing every ``REFRESH_MS``."""
    page = JobPage(feed)
    current = feed()
    if current is not None:
        page.show(current.figures())
    doc.add_root(page.root)
    doc.add_periodic_callback(page.update, REFRESH_MS)
    doc.title = TITLE
    if theme is not None:
        doc.theme = theme
    if template is not None:
        doc.template = template
        doc.template_variables.update(template_variables or {})
    return page
