from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from cocoon.api import state as st
from cocoon.api.state import ContainerState, CorruptState, LockTimeout, StateStore, Status, refresh_status
from cocoon.errors import AlreadyExists, InvalidArgument, NotFound, StateError

S = Status


def _state(cid: str = "c1", **kw) -> ContainerState:
    return ContainerState.new(cid, bundle="/b/" + cid, rootfs="/b/rootfs", **kw)


@pytest.fixture
def store(tmp_path) -> StateStore:
    return StateStore(tmp_path / "root")


# ------------------------------------------------------------------------------------------------
# Refusals first
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", ".", "..", "../etc", "a/b", "a\0b", "x" * 1025])
def test_every_entry_point_validates_the_id_before_touching_a_path(store, bad):
    for call in (store.dir, store.load, store.delete, store.exists, store.socket_dir):
        with pytest.raises(InvalidArgument) as info:
            call(bad)
        assert "\n" not in str(info.value)
        assert info.value.field == "container id"
    with pytest.raises(InvalidArgument), store.lock(bad):
        pass
    with pytest.raises(InvalidArgument):
        store.create(ContainerState(id=bad, bundle="/b"))
    assert not Path(store.root).exists()


def test_create_refuses_an_existing_id_and_leaves_it_untouched(store):
    first = _state(annotations={"a": "1"})
    store.create(first)
    before = (Path(store.dir("c1")) / "state.json").read_bytes()
    with pytest.raises(AlreadyExists) as info:
        store.create(_state(annotations={"b": "2"}))
    assert info.value.id == "c1"
    assert "\n" not in str(info.value)
    assert (Path(store.dir("c1")) / "state.json").read_bytes() == before
    assert store.load("c1") == first


def test_create_refuses_a_half_created_dir_without_touching_it(store):
    Path(store.root).mkdir(parents=True)
    (Path(store.root) / "c1").mkdir()
    with pytest.raises(AlreadyExists):
        store.create(_state())
    assert list((Path(store.root) / "c1").iterdir()) == []


def test_load_missing_names_the_id(store):
    with pytest.raises(NotFound) as info:
        store.load("ghost")
    assert info.value.id == "ghost"
    assert "ghost" in str(info.value) and "\n" not in str(info.value)


def test_load_half_created_is_not_found(store):
    Path(store.root).mkdir(parents=True)
    (Path(store.root) / "c1").mkdir()
    with pytest.raises(NotFound) as info:
        store.load("c1")
    assert info.value.id == "c1"


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", b'{"id": "c1"}', b'{"id": 5, "bundle": "/b", "status": "running"}',
     b'{"id": "c1", "bundle": "/b", "status": "exploded"}', b"\xff\xfe"],
)  # fmt: skip
def test_corrupt_state_names_the_id_and_file(store, content):
    store.create(_state())
    (Path(store.dir("c1")) / "state.json").write_bytes(content)
    with pytest.raises(CorruptState) as info:
        store.load("c1")
    assert info.value.id == "c1"
    assert info.value.file == os.path.join(store.dir("c1"), "state.json")
    assert "\n" not in str(info.value)


def test_state_of_another_id_is_corrupt(store):
    store.create(_state("c1"))
    data = json.loads((Path(store.dir("c1")) / "state.json").read_text())
    data["id"] = "c2"
    (Path(store.dir("c1")) / "state.json").write_text(json.dumps(data))
    with pytest.raises(CorruptState, match="c2"):
        store.load("c1")


def test_save_of_a_deleted_container_does_not_resurrect_it(store):
    s = _state()
    store.create(s)
    store.delete("c1")
    with pytest.raises(NotFound):
        store.save(s)
    assert not store.exists("c1")


def test_last_delete_removes_the_socket_parent(store):
    for cid in ("c1", "c2"):
        store.create(_state(cid))
        sock = store.make_socket_dir(cid)
        assert os.path.isdir(sock) and stat.S_IMODE(os.stat(sock).st_mode) == 0o700
    parent = os.path.join(store.root, st.SOCKET_DIR)
    store.delete("c1")
    assert os.path.isdir(parent) and not os.path.exists(store.socket_dir("c1"))
    store.delete("c2")
    assert os.listdir(store.root) == []  # no ~sock left behind, nothing at all


def test_socket_dir_creation_survives_a_concurrent_last_delete(store, monkeypatch):
    # delete removes ~sock when it is empty; a create that made ~sock a moment before must not fail.
    parent = os.path.join(store.root, st.SOCKET_DIR)
    real_mkdir = os.mkdir
    raced = []

    def mkdir(path, mode=0o777, **kw):
        real_mkdir(path, mode, **kw)
        if path == parent and not raced:
            raced.append(path)
            os.rmdir(parent)  # the concurrent delete's rmdir, between our two mkdirs

    monkeypatch.setattr(st.os, "mkdir", mkdir)
    store.create(_state("c1"))
    sock = store.make_socket_dir("c1")
    assert raced and os.path.isdir(sock)


def test_delete_missing_is_not_found(store):
    with pytest.raises(NotFound) as info:
        store.delete("ghost")
    assert info.value.id == "ghost"


def test_lock_of_missing_container_is_not_found(store):
    with pytest.raises(NotFound), store.lock("ghost"):
        pass


# ------------------------------------------------------------------------------------------------
# Status machine
# ------------------------------------------------------------------------------------------------

_CAN = {
    #            start  kill   delete exec   pause  resume
    S.CREATING: (False, False, False, False, False, False),
    S.CREATED: (True, True, True, True, False, False),
    S.RUNNING: (False, True, False, True, True, False),
    S.PAUSED: (False, True, False, False, False, True),
    S.STOPPED: (False, False, True, False, False, False),
}


@pytest.mark.parametrize("status", list(Status))
def test_can_table(status):
    got = (status.can_start(), status.can_kill(), status.can_delete(), status.can_exec(), status.can_pause(),
           status.can_resume())  # fmt: skip
    assert got == _CAN[status]


def test_status_is_a_plain_string():
    assert Status("running") is S.RUNNING
    assert str(S.PAUSED) == "paused"
    assert json.dumps({"s": S.CREATED}) == '{"s": "created"}'


@pytest.mark.parametrize(
    ("frm", "to"),
    [(S.CREATING, S.CREATED), (S.CREATING, S.STOPPED), (S.CREATED, S.RUNNING), (S.CREATED, S.STOPPED),
     (S.RUNNING, S.PAUSED), (S.RUNNING, S.STOPPED), (S.PAUSED, S.RUNNING), (S.PAUSED, S.STOPPED)],
)  # fmt: skip
def test_allowed_transitions(frm, to):
    assert frm.transition(to) is to


@pytest.mark.parametrize(
    ("frm", "to", "required"),
    [(S.STOPPED, S.RUNNING, "created or paused"), (S.CREATED, S.PAUSED, "running"),
     (S.RUNNING, S.CREATED, "creating"), (S.STOPPED, S.STOPPED, "creating, created, running or paused"),
     (S.CREATING, S.RUNNING, "created or paused"), (S.PAUSED, S.PAUSED, "running")],
)  # fmt: skip
def test_refused_transitions_name_current_and_required(frm, to, required):
    with pytest.raises(StateError) as info:
        frm.transition(to)
    assert info.value.state == str(frm)
    assert info.value.required == required
    assert str(frm) in str(info.value) and str(to) in str(info.value)
    assert "\n" not in str(info.value)


def test_require_names_the_action_and_the_container():
    S.CREATED.require("start", id="c1")
    with pytest.raises(StateError) as info:
        S.RUNNING.require("start", id="c1")
    assert info.value.id == "c1"
    assert info.value.state == "running"
    assert info.value.required == "created"
    assert str(info.value).startswith("cannot start container: it is running")
    with pytest.raises(StateError, match="cannot delete"):
        S.RUNNING.require("delete")
    with pytest.raises(ValueError, match="unknown action"):
        S.RUNNING.require("fly")


# ------------------------------------------------------------------------------------------------
# ContainerState and its runc views
# ------------------------------------------------------------------------------------------------


def test_rfc3339_nano_matches_go():
    assert st.rfc3339_nano(0) == "1970-01-01T00:00:00Z"
    assert st.rfc3339_nano(1_500_000_000) == "1970-01-01T00:00:01.5Z"
    assert st.rfc3339_nano(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123456789Z"
    assert st.rfc3339_nano(1_700_000_000_000_001_000) == "2023-11-14T22:13:20.000001Z"


def test_new_fills_created_owner_and_status():
    s = _state()
    assert s.status is S.CREATING
    assert s.created.endswith("Z") and s.created[:4].isdigit()
    assert s.owner  # a user name, or "#uid" when the uid has no name
    assert s.oci_version


def test_to_oci_state_is_what_runc_state_prints():
    s = _state(annotations={"io.x": "1"})
    s.status, s.pid = S.RUNNING, 4242
    out = s.to_oci_state()
    assert list(out) == ["ociVersion", "id", "pid", "status", "bundle", "rootfs", "created", "annotations", "owner"]
    assert out == {
        "ociVersion": s.oci_version, "id": "c1", "pid": 4242, "status": "running", "bundle": "/b/c1",
        "rootfs": "/b/rootfs", "created": s.created, "annotations": {"io.x": "1"}, "owner": "",
    }  # fmt: skip
    assert type(out["status"]) is str


def test_oci_state_of_stopped_container_has_pid_0_and_no_empty_annotations():
    s = _state()
    s.status, s.pid = S.STOPPED, 4242
    out = s.to_oci_state()
    assert out["pid"] == 0
    assert "annotations" not in out


def test_list_entry_carries_the_owner():
    s = _state()
    entry = s.to_list_entry()
    assert entry["owner"] == s.owner
    assert list(entry)[:7] == ["ociVersion", "id", "pid", "status", "bundle", "rootfs", "created"]


def test_replace_copies_and_equality_compares_every_field():
    s = _state(annotations={"a": "b"})
    t = s.replace(status=S.RUNNING, pid=9)
    assert (s.status, s.pid) == (S.CREATING, 0)
    assert (t.status, t.pid, t.annotations, t.created) == (S.RUNNING, 9, {"a": "b"}, s.created)
    assert t != s and t.replace(status=S.CREATING, pid=0) == s
    assert "pid=9" in repr(t)
    with pytest.raises(TypeError):
        hash(s)
    with pytest.raises(AttributeError):
        s.nonsense = 1  # type: ignore[attr-defined]


def test_dict_round_trip_ignores_unknown_keys():
    s = _state(annotations={"a": "b"}, sandbox_id="sb", config_sha="f" * 64)
    s.exit_code, s.pid_start_time, s.monitor_socket = 3, 99, "/run/cocoon/~sock/x/monitor.sock"
    data = s.to_dict()
    data["from_the_future"] = True
    assert ContainerState.from_dict(data) == s


# ------------------------------------------------------------------------------------------------
# The store
# ------------------------------------------------------------------------------------------------


def test_create_load_save_delete(store):
    s = _state()
    store.create(s)
    assert stat.S_IMODE(Path(store.root).stat().st_mode) == 0o700
    assert stat.S_IMODE(Path(store.dir("c1")).stat().st_mode) == 0o700
    assert store.exists("c1")
    assert store.load("c1") == s
    s.status = s.status.transition(S.CREATED)
    s.pid = 123
    store.save(s)
    assert store.load("c1").status is S.CREATED
    assert store.load("c1").pid == 123
    assert sorted(p.name for p in Path(store.dir("c1")).iterdir()) == ["state.json"]  # no temp files left
    store.delete("c1")
    assert not store.exists("c1")
    assert [p.name for p in Path(store.root).iterdir()] == []


def test_existing_root_mode_is_left_alone(tmp_path):
    root = tmp_path / "r"
    root.mkdir(mode=0o755)
    root.chmod(0o755)
    StateStore(root).create(_state())
    assert stat.S_IMODE(root.stat().st_mode) == 0o755


def test_default_root():
    assert StateStore().root == "/run/cocoon"
    assert StateStore("rel").root == os.path.abspath("rel")


def test_store_does_not_touch_disk_until_written(tmp_path):
    s = StateStore(tmp_path / "nope")
    assert s.list() == []
    assert not (tmp_path / "nope").exists()


def test_delete_removes_the_socket_dir(store):
    store.create(_state())
    sock = Path(store.socket_dir("c1"))
    assert len(str(sock / "monitor.sock")) < len(store.root) + 40
    sock.mkdir(parents=True)
    (sock / "monitor.sock").touch()
    store.delete("c1")
    assert not sock.exists()


def test_list_many_and_skips_what_is_not_a_container(store):
    for i in range(300):
        store.create(_state(f"c{i:03d}"))
    (Path(store.root) / "half-created").mkdir()  # mkdir done, state.json not yet written
    (Path(store.root) / "corrupt").mkdir()
    (Path(store.root) / "corrupt" / "state.json").write_text("{")
    (Path(store.root) / "stray-file").write_text("x")
    (Path(store.root) / "~deleting.abc").mkdir()  # not an id: a delete in progress
    got = store.list()
    assert [s.id for s in got] == [f"c{i:03d}" for i in range(300)]
    assert all(s.status is S.CREATING for s in got)


def test_list_tolerates_a_racing_delete(store, monkeypatch):
    store.create(_state("a"))
    store.create(_state("b"))
    real_read = st._read_state

    def read_then_vanish(path: str, cid: str) -> ContainerState:
        if cid == "a":
            raise FileNotFoundError(path)
        return real_read(path, cid)

    monkeypatch.setattr(st, "_read_state", read_then_vanish)
    assert [s.id for s in store.list()] == ["b"]


# ------------------------------------------------------------------------------------------------
# Atomic writes
# ------------------------------------------------------------------------------------------------


def test_failure_between_temp_write_and_rename_keeps_the_old_state(store, monkeypatch):
    s = _state()
    store.create(s)
    s2 = s.replace(status=S.CREATED, pid=7)

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(st.os, "rename", crash)
    with pytest.raises(OSError):
        store.save(s2)
    monkeypatch.undo()
    assert store.load("c1") == s
    assert sorted(p.name for p in Path(store.dir("c1")).iterdir()) == ["state.json"]


def test_temp_file_left_by_a_crash_is_ignored(store):
    s = _state()
    store.create(s)
    (Path(store.dir("c1")) / ".state.json.999.1").write_text('{"id": "c1", "status": "runn')
    assert store.load("c1") == s
    assert [x.id for x in store.list()] == ["c1"]
    s.status = S.CREATED
    store.save(s)
    assert store.load("c1").status is S.CREATED


_WRITER = textwrap.dedent(
    """
    import sys
    from cocoon.api.state import ContainerState, StateStore, Status
    store = StateStore(sys.argv[1])
    s = store.load("c1")
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        s.pid = i
        s.annotations = {"n": str(i), "pad": "x" * (i % 5000)}
        store.save(s)
    """
)


def test_sigkill_during_saves_never_leaves_a_torn_state(store):
    store.create(_state())
    for delay in (0.05, 0.11, 0.17, 0.23):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, store.root], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        s = store.load("c1")  # parses: either the previous or the next complete state
        assert s.annotations["n"] == str(s.pid)
        assert s.pid > 0


# ------------------------------------------------------------------------------------------------
# Locking
# ------------------------------------------------------------------------------------------------


def test_lock_serializes_threads_and_times_out(store):
    store.create(_state())
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with store.lock("c1"):
            held.set()
            release.wait(5)

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(5)
    started = time.monotonic()
    with pytest.raises(LockTimeout) as info, store.lock("c1", timeout=0.2):
        pass
    assert time.monotonic() - started >= 0.2
    assert info.value.id == "c1"
    assert isinstance(info.value, StateError)
    release.set()
    with store.lock("c1", timeout=5):
        pass
    t.join()


_COUNTER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from cocoon.api.state import StateStore
    store = StateStore(sys.argv[1])
    counter = Path(sys.argv[2])
    for _ in range(int(sys.argv[3])):
        with store.lock("c1"):
            n = int(counter.read_text())
            counter.write_text(str(n + 1))
    """
)


def test_lock_serializes_processes(store, tmp_path):
    store.create(_state())
    counter = tmp_path / "counter"
    counter.write_text("0")
    procs = [
        subprocess.Popen([sys.executable, "-c", _COUNTER, store.root, str(counter), "200"]) for _ in range(3)
    ]
    for p in procs:
        assert p.wait(60) == 0
    assert counter.read_text() == "600"


def test_waiter_sees_a_delete_that_happened_while_it_waited(store):
    store.create(_state())
    result: list[BaseException | None] = []
    in_lock = threading.Event()

    def waiter() -> None:
        in_lock.wait(5)
        try:
            with store.lock("c1", timeout=5):
                result.append(None)
        except NotFound as exc:
            result.append(exc)

    t = threading.Thread(target=waiter)
    with store.lock("c1"):
        t.start()
        in_lock.set()
        time.sleep(0.1)  # the waiter has opened the lock file and blocks on it
        store.delete("c1")
    t.join(5)
    assert len(result) == 1 and isinstance(result[0], NotFound)


# ------------------------------------------------------------------------------------------------
# refresh_status: a dead or reused pid reads as stopped
# ------------------------------------------------------------------------------------------------


def test_live_process_keeps_its_status():
    s = _state()
    s.status, s.pid, s.pid_start_time = S.RUNNING, os.getpid(), st.process_start_time(os.getpid()) or 0
    assert s.pid_start_time > 0
    assert refresh_status(s) is s


@pytest.mark.parametrize("status", [S.CREATED, S.RUNNING, S.PAUSED])
def test_gone_process_reads_as_stopped(status):
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    s = _state()
    s.status, s.pid = status, pid_max + 1  # can never exist
    out = refresh_status(s)
    assert out.status is S.STOPPED
    assert s.status is status  # the input is not changed
    assert out.to_oci_state()["pid"] == 0


def test_reused_pid_reads_as_stopped():
    s = _state()
    s.status, s.pid = S.RUNNING, os.getpid()
    s.pid_start_time = (st.process_start_time(os.getpid()) or 0) + 1
    assert refresh_status(s).status is S.STOPPED


def test_zombie_reads_as_stopped():
    proc = subprocess.Popen(["true"])
    try:
        for _ in range(500):
            if Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.01)
        s = _state()
        s.status, s.pid = S.RUNNING, proc.pid
        assert st.process_start_time(proc.pid) is None
        assert refresh_status(s).status is S.STOPPED
    finally:
        proc.wait()


def test_stopped_and_pidless_creating_are_left_alone():
    s = _state()
    assert refresh_status(s) is s  # creating, no pid yet
    s.status = S.STOPPED
    assert refresh_status(s) is s


def test_process_start_time_parses_a_comm_with_spaces_and_parens(tmp_path):
    line = "123 (evil) name) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 424242 20 21\n"
    assert st._parse_start_time(line) == 424242
