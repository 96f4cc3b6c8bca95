"""The README's cluster recipe on five hosts that share nothing, made on one machine.

Each host is a Linux network namespace with its own mount namespace (a private tmpfs on
/tmp, HOME and the working directory in it; the project and its Python environment
read-only) and hostname:

- ``sched``: ``dask scheduler`` and the client (``flows/run.py``, cwd in its private /tmp);
- ``fetch``: an I/O worker (``--nthreads N --resources io=N``);
- ``crunch``: CPU workers (``--nworkers 2 --nthreads 1 --resources cpu=1``);
- ``store``: moto's S3-compatible server, where all outputs go;
- ``images``: the demo image server.

The Dask hosts speak TLS, as the README's recipe does (a CA made by the test, its files
copied to each host's /tmp). They are joined by veth pairs to a bridge in a sixth
("switch") namespace, on a private /24 that no host routes out of: every packet stays
between the namespaces the test made.
The test asserts a manifest row per URL, the thumbnails in the store, download tasks on the
I/O host and thumbnail tasks on the CPU host (from the scheduler's task stream), that
nothing was written on the client's host but its URL list, and that a local ``--out``
(each host's own disk) is refused before any work.

Root only (CI runs as root); elsewhere it skips, saying why. Namespaces are named
``imtmh<pid>-<host>`` and removed by the fixture's finalizer, pass or fail; those of
earlier runs whose pytest is gone are removed first.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from certs import make_ca, make_cert
from conftest import ROOT, subprocess_environment
from distributed import Client, LocalCluster

import imgtasks

PREFIX = "imtmh"
HOSTS = ("sched", "fetch", "crunch", "store", "images")
URL_COUNT = 64
BATCH_SIZE = 8
IO_THREADS = 16
CPU_WORKERS = 2
BUCKET = "multihost"
SCHEDULER_PORT, STORE_PORT, IMAGES_PORT = 8786, 5000, 8000
CLIENT_DIR = "/tmp/client"  # the client's working directory, on its host's private /tmp
# The README's TLS files, copied to each Dask host's private /tmp as the recipe says.
TLS_DIR = "/tmp/tls"
TLS = (
    *("--tls-ca-file", f"{TLS_DIR}/ca.pem"),
    *("--tls-cert", f"{TLS_DIR}/cert.pem"),
    *("--tls-key", f"{TLS_DIR}/key.pem"),
)
DASK_HOSTS = ("sched", "fetch", "crunch")
CALL_TIMEOUT = 30  # seconds, for each `ip`/`nsenter` set-up command
START_TIMEOUT = 90  # seconds, for the servers and workers to come up (2 loaded cores)
FLOW_TIMEOUT = 150
# What `dask scheduler` leaves in its host's /tmp (its work directory's locks).
SCHEDULER_FILES = re.compile(
    r"dask-scratch-space/(global\.lock|purge\.lock|scheduler-\w+\.dirlock)"
)
# Shared with every host, read-only: the project and its Python environment.
SHARED = tuple(dict.fromkeys([ROOT.resolve(), Path(sys.prefix).resolve()]))
UNSHARE = ("unshare", "--mount", "--uts", "--propagation", "private")
DASHBOARD = ("--dashboard-address", "127.0.0.1:8787")  # the README's: loopback only
FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def ip(command: str, check: bool = True) -> subprocess.CompletedProcess:
    """``ip COMMAND`` (words split on spaces), output captured."""
    return subprocess.run(
        ["ip", *command.split()], capture_output=True, text=True, timeout=CALL_TIMEOUT, check=check
    )


def why_namespaces_cannot_be_made() -> str | None:
    """None where this process can make network and mount namespaces; else the reason."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    missing = [tool for tool in ("ip", "unshare", "nsenter", "env") if not shutil.which(tool)]
    if missing:
        return f"needs {', '.join(missing)} (iproute2, util-linux)"
    if os.geteuid() != 0:
        return "needs root to make network namespaces (CI runs it as root)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    made = ip(f"netns add {probe}", check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    try:
        for what, command in (
            ("a bridge", f"-n {probe} link add br0 type bridge"),
            ("a veth pair", f"-n {probe} link add probe0 type veth peer name probe1"),
        ):
            made = ip(command, check=False)
            if made.returncode != 0:
                return f"cannot make {what} in a namespace: {made.stderr.strip()}"
        tmpfs = subprocess.run(
            ["ip", "netns", "exec", probe, *UNSHARE, "sh", "-c", "mount -t tmpfs none /tmp"],
            capture_output=True,
            text=True,
            timeout=CALL_TIMEOUT,
        )
    finally:
        remove_namespace(probe)
    if tmpfs.returncode != 0:
        return f"cannot give a namespace a private /tmp: {tmpfs.stderr.strip()}"
    return None


def remove_namespace(name: str) -> None:
    """Kill what still runs in netns ``name`` (all started by this test) and delete it;
    its veth ends (and, for the switch, the bridge) go with it."""
    pids = ip(f"netns pids {name}", check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    ip(f"netns del {name}", check=False)


def remove_leftovers() -> None:
    """Namespaces of earlier runs of this test whose pytest process is gone (a crash, a
    SIGKILL): found by the prefix and the pid in their names."""
    for line in ip("netns list").stdout.splitlines():
        match = re.match(rf"({PREFIX}(\d+)-\S+)", line)
        if match and not Path(f"/proc/{match.group(2)}").exists():
            remove_namespace(match.group(1))


def private_subnet() -> ipaddress.IPv4Network:
    """A /24 in 10.0.0.0/8 that overlaps none of this machine's routes. The hosts cannot
    reach those routes anyway (their namespaces route only this subnet), but addresses
    that mean nothing else here keep the logs unambiguous."""
    routes = ip("-4 route show table all").stdout.splitlines()
    taken = []
    for line in routes:
        word = line.split(" ", 1)[0]
        with contextlib.suppress(ValueError):
            if word not in ("", "default", "local", "broadcast"):
                taken.append(ipaddress.IPv4Network(word, strict=False))
    for third in range(os.getpid() % 200, 256):
        subnet = ipaddress.IPv4Network(f"10.213.{third}.0/24")
        if not any(subnet.overlaps(net) for net in taken):
            return subnet
    raise AssertionError("no free 10.213.x.0/24 subnet")


@dataclass
class Host:
    """A network namespace plus a mount and UTS namespace held by ``init`` (a sleeping
    process): every process of the host enters both, so they share the host's /tmp."""

    name: str
    netns: str
    address: str
    init: subprocess.Popen | None = None

    @property
    def root(self) -> Path:
        """This host's filesystem as seen from the test (through /proc)."""
        assert self.init is not None
        return Path(f"/proc/{self.init.pid}/root")

    def command(self, args: list[str], cwd: str = "/tmp") -> list[str]:
        assert self.init is not None
        enter = ["nsenter", "-t", str(self.init.pid), "--net", "--mount", "--uts", "--"]
        return [*enter, "env", "-C", cwd, *args]

    def environment(self, store: str) -> dict[str, str]:
        env = subprocess_environment()  # the project importable, no proxies
        env.pop("PYTEST_CURRENT_TEST", None)
        env.update(FAKE_AWS)
        env["AWS_ENDPOINT_URL"] = store  # nothing can default to a real AWS endpoint
        env["HOME"] = env["TMPDIR"] = "/tmp"  # caches and config on the host's own disk
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # no __pycache__ in the shared source tree
        return env


@dataclass
class Network:
    """The hosts, the switch namespace that joins them, and the processes started on
    them; ``close`` stops and removes all of it."""

    subnet: ipaddress.IPv4Network
    logs: Path
    switch: str = ""
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: list[tuple[str, subprocess.Popen]] = field(default_factory=list)

    def url(self, host: str, port: int) -> str:
        return f"http://{self.hosts[host].address}:{port}"

    @property
    def scheduler(self) -> str:
        return f"tls://{self.hosts['sched'].address}:{SCHEDULER_PORT}"

    def hand_out_certificates(self, directory: Path) -> None:
        """A CA and one certificate it signs, copied to every Dask host (the README's
        "copy ca.pem, cert.pem and key.pem to every host and to the client")."""
        ca = make_ca(directory)
        node = make_cert(directory, "node", ca)
        for name in DASK_HOSTS:
            tls = self.hosts[name].root / TLS_DIR.lstrip("/")
            tls.mkdir()
            for source, target in ((ca.cert, "ca.pem"), (node.cert, "cert.pem")):
                shutil.copyfile(source, tls / target)
            shutil.copyfile(node.key, tls / "key.pem")
            (tls / "key.pem").chmod(0o600)

    @property
    def store(self) -> str:
        return self.url("store", STORE_PORT)

    def build(self) -> None:
        stem = f"{PREFIX}{os.getpid()}"
        self.switch = f"{stem}-switch"
        ip(f"netns add {self.switch}")
        ip(f"-n {self.switch} link add br0 type bridge")
        ip(f"-n {self.switch} link set br0 up")
        for number, name in enumerate(HOSTS, start=10):
            host = Host(name, f"{stem}-{name}", str(self.subnet[number]))
            self.hosts[name] = host
            self.add_host(host)

    def add_host(self, host: Host) -> None:
        ns, switch = host.netns, self.switch
        ip(f"netns add {ns}")
        # a veth pair: eth0 in the host, a port named after the host on the switch's bridge
        ip(f"link add eth0 netns {ns} type veth peer name {host.name} netns {switch}")
        ip(f"-n {switch} link set {host.name} master br0 up")
        ip(f"-n {ns} addr add {host.address}/{self.subnet.prefixlen} dev eth0")
        ip(f"-n {ns} link set eth0 up")
        ip(f"-n {ns} link set lo up")  # the dashboard and the job page listen on loopback
        # The host's own hostname and /tmp: a tmpfs in a mount namespace of its own, held by
        # a sleeping process that every later process of this host joins (nsenter). The
        # source tree and the Python environment stay shared ("the same environment on
        # every host"), read-only, so that no host can leave files there for another.
        setup = " && ".join([f"hostname {host.name}", *private_tmp_keeping(SHARED)])
        host.init = subprocess.Popen(
            ["ip", "netns", "exec", ns, *UNSHARE, "sh", "-c", f"{setup} && exec sleep 1800"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        wait_until(lambda: is_set_up(host), f"{host.name}'s private /tmp", host.init)

    def start(self, host: str, label: str, args: list[str]) -> subprocess.Popen:
        """``args`` run on ``host``; output to ``<logs>/<label>.log`` (on the test's side,
        not on the host)."""
        with open(self.logs / f"{label}.log", "wb") as log:
            proc = subprocess.Popen(
                self.hosts[host].command(args),
                env=self.hosts[host].environment(self.store),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append((label, proc))
        return proc

    def run(self, host: str, args: list[str], cwd: str = "/tmp", timeout: float = 60):
        """``args`` run to completion on ``host``, output captured."""
        return subprocess.run(
            self.hosts[host].command(args, cwd),
            env=self.hosts[host].environment(self.store),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def check_alive(self) -> None:
        for label, proc in self.procs:
            if proc.poll() is not None:
                raise AssertionError(f"{label} exited with {proc.returncode}\n{self.tails()}")

    def tails(self) -> str:
        """The end of every process's log, for a failure's message."""
        out = []
        for label, _ in self.procs:
            text = (self.logs / f"{label}.log").read_text(errors="replace")
            out.append(f"--- {label}.log (tail)\n{text[-2000:]}")
        return "\n".join(out)

    def close(self) -> None:
        for _, proc in reversed(self.procs):
            stop(proc)
        for host in self.hosts.values():
            if host.init is not None:
                stop(host.init)
            remove_namespace(host.netns)
        if self.switch:
            remove_namespace(self.switch)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM its process group, then SIGKILL what is left after 10 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def wait_until(ready, what: str, proc: subprocess.Popen, timeout: float = CALL_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise AssertionError(f"{what}: exited with {proc.returncode}: {err.strip()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not ready in {timeout} s")
        time.sleep(0.05)


def private_tmp_keeping(shared: tuple[Path, ...]) -> list[str]:
    """Shell steps (in the host's own mount namespace) that put a fresh tmpfs on /tmp and
    keep the shared directories visible, read-only, at their paths, even those under /tmp
    (CI's virtualenv is in a mktemp directory): each is bound to a staging tmpfs on
    /dev/shm first, then back to its path once /tmp is the host's own."""
    steps = ["mount -t tmpfs -o mode=1777 none /dev/shm"]  # this namespace's own, too
    for n, directory in enumerate(shared):
        steps.append(
            f"mkdir /dev/shm/keep{n} && mount --bind {shlex.quote(str(directory))} /dev/shm/keep{n}"
        )
    steps.append("mount -t tmpfs -o mode=1777 none /tmp")
    for n, directory in enumerate(shared):
        d = shlex.quote(str(directory))
        steps.append(f"mkdir -p {d} && mount --bind /dev/shm/keep{n} {d}")
        steps.append(f"mount -o remount,bind,ro {d}")
    return steps


def is_set_up(host: Host) -> bool:
    """True once the host's /tmp is its own tmpfs, not the machine's, and every shared
    directory is back in place (the same directory: device and inode)."""

    def same(path: Path, directory: Path) -> bool:
        a, b = os.stat(path), os.stat(directory)
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    with contextlib.suppress(OSError):
        own = os.stat(host.root / "tmp").st_dev != os.stat("/tmp").st_dev
        return own and all(same(host.root / str(d).lstrip("/"), d) for d in SHARED)
    return False


def files_on(host: Host) -> set[str]:
    """Every file in the host's private /tmp (its HOME and the client's cwd included)."""
    tmp = host.root / "tmp"
    shared = {host.root / str(d).lstrip("/") for d in SHARED}
    found = set()
    for top, dirs, files in os.walk(tmp):
        dirs[:] = [d for d in dirs if Path(top, d) not in shared]  # not the host's files
        found.update(str(Path(top, f).relative_to(tmp)) for f in files)
    return found


def tool(name: str, module: str) -> list[str]:
    """The console script ``name`` of this interpreter's environment, else ``-m module``."""
    exe = Path(sys.executable).with_name(name)
    return [str(exe)] if exe.exists() else [sys.executable, "-m", module]


def start_services(net: Network) -> None:
    """The README's recipe, over TLS, smaller. Servers
    listen on their host's subnet address (workers on every address of their host): safe,
    as nothing outside these namespaces can reach them."""
    dask = tool("dask", "dask")
    sched, store, images = (net.hosts[h].address for h in ("sched", "store", "images"))
    net.start(
        "store", "store", [*tool("moto_server", "moto.server"), "-H", store, "-p", str(STORE_PORT)]
    )
    demo = [sys.executable, "-m", "imgtasks.demo", "--host", images, "--port", str(IMAGES_PORT)]
    net.start("images", "images", [*demo, "--latency", "0.005", "--jitter", "0"])
    net.start(
        "sched",
        "scheduler",
        [*dask, "scheduler", "--host", sched, "--port", str(SCHEDULER_PORT), *DASHBOARD, *TLS],
    )
    io = ["--nthreads", str(IO_THREADS), "--resources", f"io={IO_THREADS}", "--no-dashboard", *TLS]
    net.start(
        "fetch",
        "io-worker",
        [*dask, "worker", net.scheduler, "--name", "io-fetch", *io, "--memory-limit", "2GiB"],
    )
    cpu = [
        "--nworkers",
        str(CPU_WORKERS),
        "--nthreads",
        "1",
        "--resources",
        "cpu=1",
        "--no-dashboard",
        *TLS,
    ]
    net.start(
        "crunch",
        "cpu-workers",
        [*dask, "worker", net.scheduler, "--name", "cpu-crunch", *cpu, "--memory-limit", "1GiB"],
    )


# Run with python -c on the client's host: the test's own process has no way into the
# subnet (it stays in the machine's namespace), so it looks through the client.
PREPARE = """
import json, os, sys, time, urllib.request
import s3fs
from distributed import Client
from distributed.security import Security

cfg = json.loads(sys.argv[1])
tls = Security(**cfg["tls"], require_encryption=True)
deadline = time.monotonic() + cfg["timeout"]

def retry(what, call):
    while True:
        try:
            return call()
        except Exception as exc:
            if time.monotonic() > deadline:
                raise SystemExit(f"{what} not up: {exc!r}")
            time.sleep(0.3)

fs = s3fs.S3FileSystem(**cfg["storage"], skip_instance_cache=True)
retry("store", lambda: fs.makedirs(cfg["bucket"], exist_ok=True))
urls = retry("image server", lambda: urllib.request.urlopen(cfg["urls"], timeout=5).read())
os.makedirs(os.path.dirname(cfg["list"]), exist_ok=True)
with open(cfg["list"], "wb") as f:
    f.write(urls)
with retry("scheduler", lambda: Client(cfg["scheduler"], timeout="5s", security=tls)) as client:
    client.wait_for_workers(cfg["workers"], timeout=max(1.0, deadline - time.monotonic()))
    client.get_task_stream()  # installs the scheduler's task-stream recorder before the run
"""

INSPECT = """
import json, sys
import pandas as pd, s3fs
from distributed import Client
from distributed.security import Security

cfg = json.loads(sys.argv[1])
tls = Security(**cfg["tls"], require_encryption=True)
out = cfg["out"]
fs = s3fs.S3FileSystem(**cfg["storage"], skip_instance_cache=True)
manifest = pd.read_parquet(f"s3://{out}/manifest", storage_options=cfg["storage"])
sizes = {p.removeprefix(out + "/"): d["size"] for p, d in fs.find(out, detail=True).items()}
jpegs = sorted(p for p in sizes if p.endswith(".jpg"))[:3]
with Client(cfg["scheduler"], timeout="10s", security=tls) as client:
    workers = client.scheduler_info(n_workers=-1)["workers"]
    stream = [[str(r["key"]), r["worker"]] for r in client.get_task_stream()]
print(json.dumps({
    "rows": json.loads(manifest.to_json(orient="records")),
    "sizes": sizes,
    "magic": {p: fs.cat_file(f"{out}/{p}", start=0, end=2).hex() for p in jpegs},
    "workers": {address: str(info["name"]) for address, info in workers.items()},
    "tasks": stream,
}))
"""


def client_python(net: Network, code: str, cfg: dict, timeout: float) -> str:
    proc = net.run("sched", [sys.executable, "-c", code, json.dumps(cfg)], timeout=timeout)
    assert proc.returncode == 0, f"{proc.stderr[-3000:]}\n{net.tails()}"
    return proc.stdout


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    reason = why_namespaces_cannot_be_made()
    if reason:
        pytest.skip(reason)
    remove_leftovers()
    net = Network(private_subnet(), tmp_path)
    try:
        net.build()
        yield net
    finally:
        net.close()


def host_of(address: str) -> str:
    return address.split("://", 1)[-1].rsplit(":", 1)[0]


@pytest.mark.timeout(240)
def test_hosts_that_share_nothing(network: Network) -> None:
    net = network
    check_isolated(net)
    net.hand_out_certificates(net.logs / "certs")
    start_services(net)
    storage = {"endpoint_url": net.store, "key": "testing", "secret": "testing"}
    cfg = {
        "storage": storage,
        "bucket": BUCKET,
        "scheduler": net.scheduler,
        "workers": 1 + CPU_WORKERS,
        "urls": f"{net.url('images', IMAGES_PORT)}/urls?count={URL_COUNT}",
        "list": f"{CLIENT_DIR}/urls.txt",
        "timeout": START_TIMEOUT,
        "out": f"{BUCKET}/run",
        "tls": {
            "tls_ca_file": f"{TLS_DIR}/ca.pem",
            "tls_client_cert": f"{TLS_DIR}/cert.pem",
            "tls_client_key": f"{TLS_DIR}/key.pem",
        },
    }
    client_python(net, PREPARE, cfg, START_TIMEOUT + 30)
    net.check_alive()
    urls = (net.hosts["sched"].root / CLIENT_DIR.lstrip("/") / "urls.txt").read_text().split()
    assert len(urls) == URL_COUNT
    assert all(url.startswith(net.url("images", IMAGES_PORT)) for url in urls)

    flow = [sys.executable, str(ROOT / "flows" / "run.py"), "--no-progress"]
    flow += ["--scheduler", net.scheduler, *TLS, "--urls", "urls.txt"]
    flow += ["--batch-size", str(BATCH_SIZE)]
    store = ["--out", f"s3://{cfg['out']}", "--storage-options", json.dumps(storage)]
    proc = net.run("sched", [*flow, *store], cwd=CLIENT_DIR, timeout=FLOW_TIMEOUT)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}{proc.stderr[-3000:]}\n{net.tails()}"
    assert "have no io/cpu resources" not in proc.stdout
    # nothing on the client's host but its URL list (and the scheduler's lock files): no
    # thumbnails, manifest parts, run.log or contact sheet, nothing in HOME
    written = files_on(net.hosts["sched"]) - {"client/urls.txt"}
    written -= {f"tls/{name}" for name in ("ca.pem", "cert.pem", "key.pem")}
    assert all(SCHEDULER_FILES.fullmatch(path) for path in written), written

    found = json.loads(client_python(net, INSPECT, cfg, 60).splitlines()[-1])
    check_store(found, urls)
    check_placement(found, net)
    check_local_out_refused(net, flow)
    net.check_alive()


def check_isolated(net: Network) -> None:
    """No host has a way out: its only route is the subnet's."""
    for host in net.hosts.values():
        routes = ip(f"-n {host.netns} -4 route").stdout.split("\n")
        assert [r.strip() for r in routes if r.strip()] == [
            f"{net.subnet} dev eth0 proto kernel scope link src {host.address}"
        ], routes


def check_store(found: dict, urls: list[str]) -> None:
    """A manifest row per URL, all ok, and each row's thumbnail in the store."""
    rows = sorted(found["rows"], key=lambda row: row["index"])
    assert [row["url"] for row in rows] == urls
    assert [row["index"] for row in rows] == list(range(len(urls)))
    bad = [row for row in rows if row["status"] != "ok"]
    assert not bad, bad[:5]
    sizes = found["sizes"]
    thumbs = {p for p in sizes if p.endswith(".jpg") and p != "contact_sheet.jpg"}
    assert thumbs == {row["path"] for row in rows}
    assert all(sizes[p] > 0 for p in thumbs)
    assert set(found["magic"].values()) == {"ffd8"}  # JPEG
    assert {"run.log", "contact_sheet.jpg"} <= set(sizes)  # the client's, made from the store


def check_placement(found: dict, net: Network) -> None:
    """Every download task ran on the I/O host, every thumbnail task on the CPU host."""
    ran: dict[str, list[str]] = {}
    for key, worker in found["tasks"]:
        ran.setdefault(key.split("-", 1)[0], []).append(host_of(worker))
    batches = URL_COUNT // BATCH_SIZE
    for stage, host in (("download", "fetch"), ("thumbnail", "crunch")):
        assert len(ran.get(stage, [])) >= batches, ran
        assert set(ran[stage]) == {net.hosts[host].address}, (stage, ran)
    names = {host_of(address): name for address, name in found["workers"].items()}
    assert names[net.hosts["fetch"].address] == "io-fetch", found["workers"]


def check_local_out_refused(net: Network, flow: list[str]) -> None:
    """A local --out would be each host's own disk: refused before any work."""
    proc = net.run("sched", [*flow, "--out", "local-out"], cwd=CLIENT_DIR, timeout=FLOW_TIMEOUT)
    assert proc.returncode == 2, f"{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "worker(s)" in lines[0] and "do not see" in lines[0], lines
    for host in ("sched", "fetch", "crunch"):  # not even run.log or the marker
        assert not any("local-out" in path for path in files_on(net.hosts[host])), host


@pytest.mark.timeout(120)
def test_a_local_out_the_workers_do_not_see_is_refused(
    tmp_path: Path, demo_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same check without namespaces (any user): a worker process in another working
    directory resolves a relative ``out`` to a directory the client does not write."""
    elsewhere = tmp_path / "worker-cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(tmp_path)
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,  # its own working directory
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(os.chdir, str(elsewhere))
        with pytest.raises(imgtasks.SetupError, match=r"--out out: .* 1 worker\(s\)"):
            imgtasks.thumbnails(demo_server.urls(3), "out", client=client, progress=False)
        assert not (elsewhere / "out").exists()
        assert [p.name for p in (tmp_path / "out").iterdir()] == []  # the marker is gone
