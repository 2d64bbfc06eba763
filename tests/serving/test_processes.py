"""The /proc finder: child processes, their states and tritonserver's Python backend stubs (Linux)."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import time

import pytest

from ofa_serving import processes


@pytest.fixture
def fake_stubs(tmp_path):
    """Two children of this process that look like Python backend stubs of ``ofa`` and ``ofa_large``, and one
    child that does not."""
    started = []

    def spawn(model: str, instance: str) -> subprocess.Popen:
        script = tmp_path / model / "1" / "model.py"
        script.parent.mkdir(parents=True)
        script.write_text("import time\ntime.sleep(60)\n")
        args = [
            f"/opt/backends/python/{processes.STUB_BINARY}",
            str(script),
            "triton_python_backend_shm_region_1",
        ]
        return subprocess.Popen([*args, "1048576", instance], executable=sys.executable)

    started.append(spawn("ofa", "ofa_0_0"))
    started.append(spawn("ofa_large", "ofa_large_0_1"))
    started.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
    try:
        yield started
    finally:
        for proc in started:
            proc.kill()
            proc.wait()


def _wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_stubs_are_found_by_model_and_instance(fake_stubs):
    ofa, large, other = fake_stubs
    # right after fork a child shows this process's command line until it execs
    _wait_until(lambda: len(processes.stub_processes(os.getpid())) == 2)
    me = os.getpid()
    found = processes.stub_processes(me)
    assert processes.StubProcess("ofa", "ofa_0_0", ofa.pid) in found
    assert processes.StubProcess("ofa_large", "ofa_large_0_1", large.pid) in found
    assert other.pid not in [s.pid for s in found]
    assert processes.stub_pids(me, "ofa") == [ofa.pid]  # not ofa_large's stub
    assert processes.stub_pids(me, "ofa_large") == [large.pid]
    table = processes.server_processes(me)
    assert table["tritonserver"] == me and table["ofa_0_0"] == ofa.pid and table["ofa_large_0_1"] == large.pid
    assert processes.stub_shm_pool(ofa.pid) == {"/dev/shm/triton_python_backend_shm_region_1"}
    assert processes.stub_shm_pool(other.pid) == set()
    children = processes.child_processes(me)
    assert children == sorted(children) and {p.pid for p in fake_stubs} <= {pid for pid, _ in children}


def test_states_stopped_zombie_gone():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert processes.is_running(proc.pid) and processes.proc_state(proc.pid) in ("R", "S", "D")
        os.kill(proc.pid, signal.SIGSTOP)
        _wait_until(lambda: processes.proc_state(proc.pid) == "T")
        assert processes.proc_state(proc.pid) == "T" and processes.is_running(proc.pid)
        proc.kill()
        _wait_until(lambda: processes.proc_state(proc.pid) == "Z")  # killed, not yet reaped
        assert processes.proc_state(proc.pid) == "Z" and not processes.is_running(proc.pid)
        assert proc.pid not in [pid for pid, _ in processes.child_processes(os.getpid())]
    finally:
        proc.kill()
        proc.wait()
    assert processes.proc_state(proc.pid) is None and processes.cmdline(proc.pid) == []
    assert not processes.is_running(proc.pid)


def test_process_group_lists_a_new_session_and_its_children():
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(60)']); time.sleep(60)",
        ],
        start_new_session=True,
    )
    try:
        _wait_until(lambda: len(processes.process_group(proc.pid)) == 2)
        group = processes.process_group(proc.pid)
        assert proc.pid in group and len(group) == 2
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_mapped_shared_memory_pools_are_listed():
    path = f"{processes.SHM_POOL_PREFIX}test_{os.getpid()}"
    with open(path, "w+b") as pool:
        pool.truncate(4096)
        try:
            with mmap.mmap(pool.fileno(), 4096):
                assert path in processes.shm_pools(os.getpid())
        finally:
            os.unlink(path)
    assert path not in processes.shm_pools(os.getpid())
