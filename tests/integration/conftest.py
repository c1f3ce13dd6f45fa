"""Real engines driving cocoon: a private containerd, podman and dockerd, and a local busybox image.

Everything lives under one short temp directory (unix socket paths must stay < 108 bytes):

    /tmp/cocoon-it-XXXX/
        image/       umoci layout, rootfs, busybox.tar (docker-archive of localhost/cocoon-busybox:latest)
        containerd/  config.toml, root, state, c.sock, containerd.log; runc-root/ = cocoon's --root
        podman/      containers.conf, root, runroot, tmp   (cocoon runs with its default root, see below)
        docker/      data, exec (exec/runtime-runc/moby = cocoon's --root), d.sock, dockerd.log

No daemon touches the host's network (no CNI, no bridge, no iptables) and each is stopped at the
end of the session together with its shims. A daemon that cannot start here skips its tests with
the reason. Every test checks afterwards that it left no qemu/virtiofsd/cocoon monitor process and
no container in any cocoon state root (see ``_no_leftovers``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import helpers as h
from helpers import IMAGE, NAMESPACE

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.integration)


# -- basics ---------------------------------------------------------------------------------------------
@dataclass
class Session:
    """What the session set up: the temp base, the runtime binary and the state roots in use."""

    base: Path
    cocoon: str
    default_root: str
    #: cocoon state roots in use -> the entries they held when registered (other users' containers)
    roots: dict[str, set[str]] = field(default_factory=dict)

    def add_root(self, root: str) -> None:
        self.roots.setdefault(root, h.containers_in(root))

    @property
    def markers(self) -> list[str]:
        # Our processes name our temp base (bundles, --root) or, for podman, which runs cocoon with its
        # default root, that root's socket directory.
        return [str(self.base), f"{self.default_root.rstrip('/')}/~sock/"]

    def cocoon_cmd(self, root: str, *args: str, timeout: float = 60) -> h.Result:
        return h.run([self.cocoon, "--root", root, *args], timeout=timeout)


@pytest.fixture(scope="session")
def session(tmp_path_factory, request) -> Session:
    if os.geteuid() != 0:
        pytest.skip("integration tests need root (they start containerd, dockerd, podman)")
    cocoon = h.cocoon_binary()
    if cocoon is None:
        pytest.skip("no cocoon binary (set COCOON_BIN, or link /usr/local/bin/cocoon)")
    if h.missing_binaries("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 is not installed")
    from cocoon import config

    # The engines run cocoon without COCOON_CONFIG (conmon clears the environment; we drop it for the
    # others too), so cocoon reads /etc/cocoon/configuration.toml if it exists, else its defaults.
    saved_config = os.environ.pop("COCOON_CONFIG", None)
    default_root = config.load(str(config.DEFAULT_PATH) if config.DEFAULT_PATH.exists() else None).runtime.root
    # The guest image must exist before a daemon's first create (cached by content hash).
    built = h.run([cocoon, "image", "build", "--json"], timeout=600)
    if built.returncode != 0:
        if saved_config is not None:
            os.environ["COCOON_CONFIG"] = saved_config
        pytest.fail(f"cannot build the guest image: {built}")
    base = Path(tempfile.mkdtemp(prefix="cocoon-it-", dir="/tmp"))
    s = Session(base=base, cocoon=cocoon, default_root=default_root)
    yield s
    if saved_config is not None:
        os.environ["COCOON_CONFIG"] = saved_config
    h.unmount_below(base)
    if request.session.testsfailed:
        print(f"\nintegration: logs and state kept in {base}", file=sys.stderr)
    else:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def image_archive(session) -> Path:
    """A busybox OCI image made locally (umoci + skopeo), as a docker-archive tarball."""
    missing = h.missing_binaries("umoci", "skopeo")
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (apt-get install umoci skopeo)")
    from cocoon.api.demo_image import export, make_layout

    layout = make_layout(session.base / "image")
    return export(layout, "latest", IMAGE, session.base / "image" / "busybox.tar")


# -- leftovers ------------------------------------------------------------------------------------------
Snapshot = tuple[set[int], dict[str, set[str]]]


def _snapshot(session: Session) -> Snapshot:
    return set(h.ours(session.markers)), {root: h.containers_in(root) for root in session.roots}


def _new_since(session: Session, before: Snapshot) -> tuple[dict[int, h.Proc], dict[str, set[str]]]:
    """Our processes and root entries that appeared since ``before`` (roots registered later: since then)."""
    procs = {pid: p for pid, p in h.ours(session.markers).items() if pid not in before[0]}
    entries = {}
    for root, baseline in session.roots.items():
        new = h.containers_in(root) - before[1].get(root, baseline)
        if new:
            entries[root] = new
    return procs, entries


def check_nothing_left(session: Session, before: Snapshot, grace: float = 20.0) -> None:
    """Wait up to ``grace`` s for what appeared since ``before`` to go; then remove it and fail."""
    # A monitor winds down (VM poweroff, virtiofsd, unmounts) right after its client returned.
    deadline = time.monotonic() + grace
    procs, entries = _new_since(session, before)
    while (procs or entries) and time.monotonic() < deadline:
        time.sleep(0.25)
        procs, entries = _new_since(session, before)
    if not procs and not entries:
        return
    for root, names in entries.items():
        for name in sorted(names):
            if name.startswith("~"):
                shutil.rmtree(Path(root) / name, ignore_errors=True)
            else:
                session.cocoon_cmd(root, "delete", "--force", name)
    h.kill_pids(procs)
    left_procs = [f"{pid}: {p.cmdline[:200]}" for pid, p in sorted(procs.items())]
    left_entries = [f"{root}/{name}" for root, names in sorted(entries.items()) for name in sorted(names)]
    raise AssertionError(f"left behind (now removed): processes {left_procs}, containers {left_entries}")


@pytest.fixture(autouse=True)
def _no_leftovers(request):
    """After every test: no new qemu/virtiofsd/cocoon process of ours and no new container in any root."""
    if "session" not in request.fixturenames:
        yield
        return
    session: Session = request.getfixturevalue("session")
    before = _snapshot(session)
    yield
    check_nothing_left(session, before)


@pytest.fixture(scope="module", autouse=True)
def _no_leftovers_module(request):
    """The same for each module, after its module-scoped containers were torn down."""
    if os.geteuid() != 0:
        yield
        return
    session: Session = request.getfixturevalue("session")
    before = _snapshot(session)
    yield
    check_nothing_left(session, before)


# -- containerd ----------------------------------------------------------------------------------------
@dataclass
class Containerd:
    session: Session
    directory: Path
    daemon: h.Daemon

    @property
    def sock(self) -> str:
        return str(self.directory / "c.sock")

    @property
    def state_dir(self) -> Path:
        return self.directory / "state"

    @property
    def runc_root(self) -> str:
        return str(self.directory / "runc-root")

    @property
    def cocoon_root(self) -> str:
        return f"{self.runc_root}/{NAMESPACE}"  # the shim appends the namespace to --runc-root

    def runtime_flags(self) -> list[str]:
        return ["--runtime", "io.containerd.runc.v2", "--runc-binary", self.session.cocoon,
                "--runc-root", self.runc_root]  # fmt: skip

    def argv(self, *args: str) -> list[str]:
        return ["ctr", "-a", self.sock, "-n", NAMESPACE, *args]

    def ctr(self, *args: str, timeout: float = 120, check: bool = False) -> h.Result:
        return h.run(self.argv(*args), timeout=timeout, check=check)

    def task_dir(self, cid: str) -> Path:
        return self.state_dir / "io.containerd.runtime.v2.task" / NAMESPACE / cid

    def task_status(self, cid: str) -> str | None:
        out = self.ctr("task", "ls", timeout=30)
        for line in out.stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == cid:
                return fields[-1]
        return None

    def cleanup(self, cid: str) -> None:
        """Best effort, also for a client that hung: the runtime first, then containerd's records."""
        self.session.cocoon_cmd(self.cocoon_root, "delete", "--force", cid, timeout=60)
        for args in (("task", "kill", "-s", "SIGKILL", cid), ("task", "delete", "-f", cid),
                     ("container", "delete", cid)):  # fmt: skip
            with contextlib.suppress(AssertionError):
                self.ctr(*args, timeout=30)

    def shims(self) -> list[h.Proc]:
        return [p for p in h.descendants_and_marked(self.sock) if "containerd-shim" in p.cmdline]


@pytest.fixture(scope="session")
def containerd(session, image_archive) -> Containerd:
    missing = h.missing_binaries("containerd", "ctr", "containerd-shim-runc-v2")
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (apt-get install containerd)")
    d = session.base / "containerd"
    d.mkdir()
    (d / "config.toml").write_text(
        "version = 2\n"
        f'root = "{d}/root"\n'
        f'state = "{d}/state"\n'
        # CRI would need restrict_oom_score_adj here (no CAP_SYS_RESOURCE); ctr does not use it.
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        "[grpc]\n"
        f'  address = "{d}/c.sock"\n'
        "[ttrpc]\n"
        f'  address = "{d}/c.sock.ttrpc"\n'
        "[debug]\n"
        '  level = "info"\n'
    )
    daemon = h.Daemon("containerd", ["containerd", "--config", str(d / "config.toml")], d / "containerd.log")
    c = Containerd(session, d, daemon)
    session.add_root(c.cocoon_root)
    daemon.start()
    with contextlib.suppress(AssertionError):
        h.wait_for(lambda: not daemon.alive() or c.ctr("version", timeout=10).returncode == 0, 30,
                   "containerd to answer")  # fmt: skip
    if not daemon.alive() or c.ctr("version", timeout=10).returncode != 0:
        tail = daemon.tail()
        daemon.stop()
        pytest.skip(f"containerd cannot start here:\n{tail}")
    c.ctr("image", "import", str(image_archive), timeout=120, check=True)
    yield c
    listed = c.ctr("container", "list", "-q", timeout=30).stdout.split()
    for cid in listed:
        c.cleanup(cid)
    daemon.stop()
    h.kill_pids(p.pid for p in c.shims())
    h.kill_pids(h.ours([str(d)]))


# -- podman --------------------------------------------------------------------------------------------
@dataclass
class Podman:
    session: Session
    directory: Path
    env: dict[str, str]

    @property
    def cocoon_root(self) -> str:
        # conmon runs the runtime without global flags and podman's --runtime-flag is not passed on to the
        # `podman container cleanup` that conmon starts (it calls `delete --force` with no --root), so the
        # root cannot be made private without a wrapper: cocoon's default root is used.
        return self.session.default_root

    def argv(self, *args: str) -> list[str]:
        d = self.directory
        return ["podman", "--root", str(d / "root"), "--runroot", str(d / "runroot"), "--tmpdir", str(d / "tmp"),
                "--cgroup-manager", "cgroupfs", "--events-backend", "file",
                "--runtime", self.session.cocoon, *args]  # fmt: skip

    def __call__(self, *args: str, timeout: float = 120, check: bool = False) -> h.Result:
        return h.run(self.argv(*args), timeout=timeout, env=self.env, check=check)


@pytest.fixture(scope="session")
def podman(session, image_archive) -> Podman:
    missing = h.missing_binaries("podman", "conmon")
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (apt-get install podman)")
    d = session.base / "podman"
    d.mkdir()
    conf = d / "containers.conf"
    conf.write_text(
        "[containers]\n"
        # No CAP_SYS_RESOURCE here: podman's default ulimits could not be applied.
        'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
        'netns = "none"\n'
        'log_driver = "k8s-file"\n'
        "[engine]\n"
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        "[engine.runtimes]\n"
        f'cocoon = ["{session.cocoon}"]\n'
    )
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}
    env.pop("CONTAINERS_STORAGE_CONF", None)
    p = Podman(session, d, env)
    info = p("info", "--format", "json", timeout=60)
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: {info.stderr.strip()[-2000:]}")
    session.add_root(p.cocoon_root)
    p("load", "-i", str(image_archive), timeout=120, check=True)
    yield p
    p("rm", "--all", "--force", "--time", "0", timeout=120)
    for proc in h.descendants_and_marked(str(d)):
        if "conmon" in proc.cmdline:
            h.kill_pids([proc.pid])
    h.unmount_below(d)


# -- docker --------------------------------------------------------------------------------------------
@dataclass
class Docker:
    session: Session
    directory: Path
    env: dict[str, str]
    daemon: h.Daemon

    @property
    def exec_root(self) -> Path:
        return self.directory / "exec"

    @property
    def cocoon_root(self) -> str:
        # dockerd passes --root <exec-root>/runtime-runc/moby to every runc-compatible runtime.
        return str(self.exec_root / "runtime-runc" / "moby")

    def __call__(self, *args: str, timeout: float = 120, check: bool = False) -> h.Result:
        return h.run(["docker", *args], timeout=timeout, env=self.env, check=check)


@contextlib.contextmanager
def run_docker(session: Session, image_archive: Path, name: str = "docker", netns: str = "") -> Iterator[Docker]:
    """A private dockerd with runtime ``cocoon`` and the session's image. In the host's network
    namespace it makes no network changes (no docker0, no iptables rules); in ``netns`` (a
    namespace the test made) it keeps its default bridge there."""
    missing = h.missing_binaries("dockerd", "docker")
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (apt-get install docker.io)")
    d = session.base / name
    (d / "client").mkdir(parents=True)
    (d / "daemon.json").write_text("{}\n")  # never the host's /etc/docker/daemon.json
    sock = d / "d.sock"
    argv = ["dockerd", "--config-file", str(d / "daemon.json"), "--data-root", str(d / "data"),
            "--exec-root", str(d / "exec"), "--pidfile", str(d / "dockerd.pid"), "-H", f"unix://{sock}",
            "--iptables=false", "--ip6tables=false", "--add-runtime", f"cocoon={session.cocoon}"]  # fmt: skip
    argv = ["nsenter", f"--net={netns}", *argv] if netns else [*argv, "--bridge=none"]
    daemon = h.Daemon("dockerd", argv, d / "dockerd.log")
    env = {**os.environ, "DOCKER_HOST": f"unix://{sock}", "DOCKER_CONFIG": str(d / "client")}
    k = Docker(session, d, env, daemon)
    session.add_root(k.cocoon_root)
    daemon.start()
    with contextlib.suppress(AssertionError):
        h.wait_for(lambda: not daemon.alive() or k("info", timeout=10).returncode == 0, 60, "dockerd to answer")
    if not daemon.alive() or k("info", timeout=10).returncode != 0:
        tail = daemon.tail()
        daemon.stop()
        h.kill_pids(p.pid for p in h.descendants_and_marked(str(d)))
        h.unmount_below(d)
        pytest.skip(f"dockerd cannot start here:\n{tail}")
    try:
        runtimes = json.loads(k("info", "--format", "{{json .Runtimes}}", check=True).stdout)
        assert "cocoon" in runtimes, runtimes
        k("load", "-i", str(image_archive), timeout=120, check=True)
        yield k
    finally:
        ids = k("ps", "-aq", timeout=30).stdout.split()
        if ids:
            k("rm", "-f", *ids, timeout=120)
        daemon.stop(grace=30)  # dockerd stops its own containerd and shims
        h.kill_pids(p.pid for p in h.descendants_and_marked(str(d)))
        h.unmount_below(d)


@pytest.fixture(scope="session")
def docker(session, image_archive) -> Iterator[Docker]:
    with run_docker(session, image_archive) as k:
        yield k


@pytest.fixture
def pty_env() -> dict[str, str]:
    return {**os.environ, "TERM": "dumb"}


def free_id(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{int(time.time() * 1000) % 100000}"


@pytest.fixture
def cid(request) -> str:
    """A container id/name unique to this test."""
    return free_id(request.node.name.removeprefix("test_").replace("_", "-")[:30])


# -- containerd with CRI, running cocoon's shim v2 (tests/integration/shim_env.py) ---------------------
@pytest.fixture(scope="session")
def shim_containerd(session, image_archive):
    import shim_env

    missing = h.missing_binaries("containerd", "ctr", "containerd-shim-cocoon-v2")
    if missing:
        pytest.skip(f"missing {', '.join(missing)} (make deps installs them)")
    c = shim_env.make(session.base)
    c.start()
    if not c.answers():
        tail = c.daemon.tail()
        c.daemon.stop()
        pytest.skip(f"containerd cannot start here:\n{tail}")
    pause = shim_env.pause_archive(session.base / "image" / "oci", session.base / "image" / "pause.tar")
    for ns in (shim_env.NAMESPACE_CRI, shim_env.NAMESPACE_CTR):
        c.ctr("image", "import", str(image_archive), ns=ns, timeout=120, check=True)
    c.ctr("image", "import", str(pause), ns=shim_env.NAMESPACE_CRI, timeout=120, check=True)
    yield c
    c.daemon.stop()
    h.kill_pids(p.pid for p in c.shims())
    h.unmount_below(c.directory)
