"""tritonserver's processes as Linux's ``/proc`` shows them: the one place that reads it.

tritonserver runs one Python backend stub per model instance as its child process. A stub's command line is
``.../triton_python_backend_stub <repository>/<model>/<version>/model.py <shm region> ... <instance> ...``, where
``<instance>`` is ``<model>_<group>_<index>`` (``ofa_0_0``). The supervisor kills and counts stubs through this
module; the hardening tests, the soak and the burst find them the same way. Standard library only, Linux only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "SHM_POOL_PREFIX",
    "STUB_BINARY",
    "StubProcess",
    "child_processes",
    "cmdline",
    "is_running",
    "proc_state",
    "process_group",
    "server_processes",
    "shm_pools",
    "stub_shm_pool",
    "stub_pids",
    "stub_processes",
]

#: The file name of the Python backend's stub executable (``argv[0]`` of every stub).
STUB_BINARY = "triton_python_backend_stub"

#: Where the Python backend's shared-memory pools live, one per stub (named on its command line); tritonserver and
#: the stub map it.
SHM_POOL_PREFIX = "/dev/shm/triton_python_backend_shm_region_"

_MODEL_FILE = re.compile(r"/([^/]+)/\d+/model\.py$")
_GONE = ("Z", "X")  # zombie, dead: the process no longer runs


def _stat(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name: ``[state, ppid, pgrp, ...]`` (``None`` if gone).

    The command name sits in parentheses and may hold spaces and parentheses: the fields start after the last ``)``.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def cmdline(pid: int) -> list[str]:
    """The argument vector of ``pid`` (``[]`` if it is gone or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def proc_state(pid: int) -> str | None:
    """The state letter of ``pid`` (``R``, ``S``, ``D``, ``T`` stopped, ``t`` traced, ``Z`` zombie, ...); ``None``
    when there is no such process."""
    fields = _stat(pid)
    return fields[0] if fields else None


def is_running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    state = proc_state(pid)
    return state is not None and state not in _GONE


def _live_processes(field: int, value: int) -> list[int]:
    """PIDs of the live processes whose stat field ``field`` (1: parent, 2: process group) equals ``value``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if fields is not None and int(fields[field]) == value and fields[0] not in _GONE:
            found.append(int(entry.name))
    return sorted(found)


def child_processes(parent: int) -> list[tuple[int, list[str]]]:
    """``(pid, argv)`` of the live (not zombie) child processes of ``parent``, sorted by PID."""
    return [(pid, cmdline(pid)) for pid in _live_processes(1, parent)]


def process_group(pgid: int) -> list[int]:
    """PIDs of the live members of process group ``pgid`` (a server started in a session of its own and its stubs,
    also once the server is gone and the stubs were orphaned)."""
    return _live_processes(2, pgid)


@dataclass(frozen=True)
class StubProcess:
    """One Python backend stub: the model it serves, its instance name (``ofa_0_0``) and its PID."""

    model: str
    instance: str
    pid: int


def _stub(pid: int, args: list[str]) -> StubProcess | None:
    """The stub that ``args`` (a command line) describes, else ``None``."""
    if len(args) < 2 or not args[0].endswith(STUB_BINARY):
        return None
    match = _MODEL_FILE.search(args[1])
    if match is None:
        return None
    model = match.group(1)
    instance = re.compile(rf"^{re.escape(model)}_\d+_\d+$")
    name = next((a for a in args[2:] if instance.match(a)), model)
    return StubProcess(model, name, pid)


def stub_processes(server_pid: int) -> list[StubProcess]:
    """The live Python backend stubs of the tritonserver ``server_pid``, sorted by PID."""
    stubs = (_stub(pid, args) for pid, args in child_processes(server_pid))
    return [stub for stub in stubs if stub is not None]


def stub_pids(server_pid: int, model: str) -> list[int]:
    """PIDs of the live stubs of ``model`` (one per instance) under the tritonserver ``server_pid``."""
    return [stub.pid for stub in stub_processes(server_pid) if stub.model == model]


def server_processes(server_pid: int) -> dict[str, int]:
    """``{"tritonserver": pid, "<instance>": pid, ...}``: the server and each of its live stubs."""
    return {"tritonserver": server_pid, **{stub.instance: stub.pid for stub in stub_processes(server_pid)}}


def shm_pools(pid: int) -> set[str]:
    """Paths of the Python backend shared-memory pools that ``pid`` maps (tritonserver: one per stub it runs;
    empty if it is gone)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text(errors="replace")
    except OSError:
        return set()
    found = set()
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
        if len(fields) == 6 and fields[5].startswith(SHM_POOL_PREFIX):
            found.add(fields[5].removesuffix(" (deleted)").strip())
    return found


def stub_shm_pool(pid: int) -> set[str]:
    """The path of the pool named on the command line of the stub ``pid`` (a stub just started may not map it yet);
    empty for any other process."""
    directory, prefix = SHM_POOL_PREFIX.rsplit("/", 1)
    return {f"{directory}/{a}" for a in cmdline(pid) if a.startswith(prefix) and "/" not in a}
