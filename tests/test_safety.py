"""Safety: every server binds loopback only; the thumbnail function survives fuzzing."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import SLOW_RUN, non_loopback_address, start_flow
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from imgtasks.demo import DemoServer, ServerSettings
from imgtasks.thumbnail import ThumbSettings, make_thumbnail

LOOPBACK = {"127.0.0.1", "::1"}
# docs/architecture.md: the statuses the thumbnail stage records (empty_body for no bytes).
THUMBNAIL_STATUSES = {
    "ok",
    "decode_error",
    "truncated_image",
    "too_many_pixels",
    "encode_error",
    "empty_body",
    "unsupported_format",
}


def refused_on(address: str, port: int) -> bool:
    """True when nothing accepts on ``address:port`` (this machine's own address)."""
    try:
        with socket.create_connection((address, port), timeout=2):
            return False
    except OSError:
        return True


def listening(procs: list[psutil.Process]) -> dict[tuple[int, str, int], str]:
    """(pid, ip, port) -> kind of every listening TCP socket and bound UDP socket."""
    found = {}
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            for c in proc.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found[(proc.pid, c.laddr.ip, c.laddr.port)] = "tcp"
                elif c.type == socket.SOCK_DGRAM and not c.raddr:
                    found[(proc.pid, c.laddr.ip, c.laddr.port)] = "udp"
    return found


# --------------------------------------------------------------------------- loopback only


def test_demo_server_listens_on_loopback_only() -> None:
    with DemoServer(ServerSettings(latency=0.0, jitter=0.0)) as server:
        mine = listening([psutil.Process()])
        sockets = {(ip, port) for (_pid, ip, port) in mine if port == server.port}
        assert sockets == {("127.0.0.1", server.port)}
        with socket.create_connection(("127.0.0.1", server.port), timeout=5):
            pass
        other = non_loopback_address()
        if other is not None:
            assert refused_on(other, server.port)


@pytest.fixture
def running_flow(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """The default run (embedded demo server, hybrid cluster, default dashboard address)."""
    out = tmp_path / "out"
    proc = start_flow(
        [*SLOW_RUN, "--out", str(out)],
        cwd=tmp_path,
    )
    try:
        yield proc, out
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)


@pytest.mark.timeout(180)
def test_every_socket_of_the_flow_process_tree_is_on_loopback(
    running_flow: tuple[subprocess.Popen, Path],
) -> None:
    proc, out = running_flow
    flow = psutil.Process(proc.pid)
    deadline = time.monotonic() + 120
    # Mid-run: a manifest part exists, so the demo server, scheduler, nannies and workers
    # (one I/O, one CPU) are all up.
    while not list((out / "manifest").glob("part-*.parquet")):
        assert proc.poll() is None, proc.stderr.read()[-3000:] if proc.stderr else ""
        assert time.monotonic() < deadline, "no manifest part after 120 s"
        time.sleep(0.1)
    tree = [flow, *flow.children(recursive=True)]
    sockets = listening(tree)
    assert proc.poll() is None, "the run ended before its sockets were checked"
    workers = {pid for (pid, _ip, _port) in sockets if pid != flow.pid}
    # flow process: demo server, scheduler, dashboard, two nannies; each worker: its
    # server and its own dashboard.
    assert len(workers) == 2, sockets
    assert sum(1 for (pid, *_rest) in sockets if pid == flow.pid) >= 5, sockets
    assert all(pid in workers for pid, *_ in sockets if pid != flow.pid)
    exposed = {key: kind for key, kind in sockets.items() if key[1] not in LOOPBACK}
    assert exposed == {}
    other = non_loopback_address()
    if other is not None:
        still_up = [port for (_pid, _ip, port), kind in sockets.items() if kind == "tcp"]
        assert [p for p in still_up if not refused_on(other, p)] == []
    assert proc.poll() is None
    print("\nlistening:", sorted(sockets.items()))


# --------------------------------------------------------------------------- fuzzing


def _sample(fmt: str) -> bytes:
    im = Image.radial_gradient("L").resize((96, 64)).convert("RGB")
    im.paste((200, 30, 60), (10, 10, 50, 40))
    buf = io.BytesIO()
    if fmt == "GIF":
        im = im.convert("P")
    im.save(buf, fmt, **({"quality": 80} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()


SAMPLES = {fmt: _sample(fmt) for fmt in ("JPEG", "PNG", "GIF", "WEBP")}
HEADER = 64  # bytes spliced from one format's start onto another's body


@st.composite
def hostile_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["random", "flips", "truncate", "splice", "flips+truncate"]))
    if kind == "random":
        return draw(st.binary(max_size=4096))
    data = bytearray(SAMPLES[draw(st.sampled_from(sorted(SAMPLES)))])
    if kind == "splice":
        head = SAMPLES[draw(st.sampled_from(sorted(SAMPLES)))]
        cut = draw(st.integers(0, HEADER))
        data = bytearray(head[:cut]) + data[draw(st.integers(0, HEADER)) :]
    if "flips" in kind or kind == "splice":
        for pos, bit in draw(
            st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 7)), max_size=24)
        ):
            data[pos] ^= 1 << bit
    if "truncate" in kind:
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


FUZZ_SETTINGS = st.builds(
    ThumbSettings,
    size=st.sampled_from([(128, 128), (32, 48)]),
    mode=st.sampled_from(["fit", "crop", "pad"]),
    format=st.sampled_from(["jpeg", "png", "webp"]),
    max_pixels=st.sampled_from([100_000_000, 4096]),
)


@pytest.mark.timeout(240)
@settings(
    max_examples=300,
    deadline=2000,  # ms per example: a hang or a slow path fails the test
    database=None,  # no .hypothesis/ directory left in the checkout
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=hostile_bytes(), thumb=FUZZ_SETTINGS)
def test_make_thumbnail_survives_fuzzing(data: bytes, thumb: ThumbSettings) -> None:
    result = make_thumbnail(data, thumb)  # must not raise
    assert result.status in THUMBNAIL_STATUSES
    assert result.ok == (result.status == "ok") == (result.data is not None)
    if not result.ok:
        assert result.error
        return
    assert 0 < result.width <= thumb.size[0] and 0 < result.height <= thumb.size[1]
    with Image.open(io.BytesIO(result.data)) as im:
        im.load()
        assert im.size == (result.width, result.height)
        assert im.format == thumb.pillow_format


def test_fuzz_samples_are_valid_images() -> None:
    """The mutation bases decode as given, so the fuzzing starts from real images."""
    for fmt, data in SAMPLES.items():
        thumb = make_thumbnail(data)
        assert thumb.ok and thumb.source_format == fmt, (fmt, thumb.error)
