"""Shared fixtures: every server a test needs is started here on 127.0.0.1, with time-outs."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOWS = ROOT / "flows"
if str(FLOWS) not in sys.path:  # flows/ are scripts; tests import them as modules
    sys.path.insert(0, str(FLOWS))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def demo_server() -> Iterator[object]:
    """A demo image server with no latency, shared by the session."""
    from imgtasks.demo_server import DemoServer, ServerSettings

    with DemoServer(ServerSettings(latency=0.0, jitter=0.0)) as server:
        yield server


def subprocess_environment() -> dict[str, str]:
    """Environment for subprocesses: the project importable, no proxies to escape loopback."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        env.pop(var, None)
    env["NO_PROXY"] = "127.0.0.1,localhost"
    return env


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    return subprocess_environment()
