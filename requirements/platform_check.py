"""What ``make setup`` checks and decides before it installs anything: the platform and the torch build.

It lives in ``requirements/``, beside the pins it guards, and in no package: it runs before any package (or even
the virtual environment) exists, so it cannot be imported from an installed one.

Run by path with the interpreter that will create the virtual environment, before any environment exists, so
this file uses the standard library only and parses on Python 3.6 (a newcomer's old system python3 must get
the sentence below, not a SyntaxError)::

    python3 requirements/platform_check.py [--torch auto]   # exit 1 with one sentence if unsupported
    .venv/bin/python requirements/platform_check.py --install-torch auto   # install the chosen build

The platform: ``nvidia-pytriton`` (which carries the ``tritonserver`` binary) is one wheel tagged
``manylinux_2_35_x86_64`` with Python-backend stubs for Python 3.8-3.13, and the project needs Python 3.10+
(torch 2.13 too): so Linux on x86_64 with glibc 2.35 or newer and Python 3.10-3.13.

The torch build (``TORCH``): ``auto`` picks the CPU build where no NVIDIA driver answers and the newest CUDA
build the driver can run where one does; ``cpu``, ``cu126``, ``cu130`` and ``cu132`` choose one. The pure
functions (``platform_problem``, ``choose_torch_build``, ``torch_requirement``) take descriptions, so the tests
feed them fake machines; ``main()`` reads the real one.
"""

# ruff: noqa: UP006, UP007, UP035, UP045 -- typing.Optional/List/Tuple: this file must run on old Pythons.
import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List, NamedTuple, Optional, Tuple

MIN_GLIBC = (2, 35)
PYTHON_RANGE = ((3, 10), (3, 13))
NEEDS = "make setup needs Linux on x86_64 with glibc 2.35 or newer and Python 3.10 to 3.13"
WHY_PLATFORM = "tritonserver comes from the nvidia-pytriton wheel, which is built for manylinux_2_35_x86_64"
WHY_PYTHON = (
    "the Python-backend stubs of nvidia-pytriton stop at 3.13; torch 2.13 and this project need 3.10+"
)
LINUX = "Ubuntu 22.04, Debian 12, Fedora 36 or newer"

REPO = Path(__file__).resolve().parents[1]
RUNTIME_REQUIREMENTS = REPO / "requirements" / "runtime.txt"
PYTORCH_INDEX = "https://download.pytorch.org/whl/"


class Platform(NamedTuple):
    """A machine as ``make setup`` sees it (``platform``/``sys`` names; ``describe_platform()`` reads this one)."""

    system: str  # platform.system(): "Linux", "Darwin", "Windows"
    machine: str  # platform.machine(): "x86_64", "aarch64", "arm64", "AMD64"
    libc: str  # platform.libc_ver()[0]: "glibc", or "" where unknown (musl)
    libc_version: str  # platform.libc_ver()[1]: "2.36"
    python: Tuple[int, int]  # sys.version_info[:2] of the interpreter that creates the environment
    python_path: str = "python3"


def _version(text: str) -> Tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def _dotted(version: Tuple[int, ...]) -> str:
    return ".".join(str(part) for part in version)


def platform_problem(machine: Platform) -> Optional[str]:
    """The one sentence that says why ``make setup`` cannot work on ``machine`` and what to do; None if it can."""
    platform_head = NEEDS + " (" + WHY_PLATFORM + "), but "
    if machine.system != "Linux":
        name = {"Darwin": "macOS", "Windows": "Windows"}.get(
            machine.system, machine.system or "an unknown OS"
        )
        where = (
            "WSL 2 with Ubuntu 22.04 or newer" if machine.system == "Windows" else "a Linux x86_64 machine"
        )
        return platform_head + "this is {} on {}: use {}.".format(name, machine.machine or "?", where)
    if machine.machine.lower() not in ("x86_64", "amd64"):
        arch = machine.machine or "an unknown architecture"
        return platform_head + f"this Linux runs on {arch}: use an x86_64 machine."
    if machine.libc != "glibc" or not machine.libc_version:
        return platform_head + "no glibc was found (musl or another C library): use " + LINUX + "."
    if _version(machine.libc_version)[:2] < MIN_GLIBC:
        return platform_head + f"this Linux has glibc {machine.libc_version}: use {LINUX}."
    low, high = PYTHON_RANGE
    if not low <= tuple(machine.python) <= high:
        return (
            NEEDS
            + " ("
            + WHY_PYTHON
            + f"), but {machine.python_path} is Python {_dotted(machine.python)}: run `make setup PYTHON=python3.12` (or another Python 3.10 to 3.13)."
        )
    return None


def describe_platform() -> Platform:
    """This machine and the interpreter running this file."""
    try:  # the running C library; platform.libc_ver() of Python < 3.8 reads the executable's symbol versions
        libc, libc_version = os.confstr("CS_GNU_LIBC_VERSION").split()
    except (AttributeError, ValueError, OSError):
        libc, libc_version = platform.libc_ver()
    return Platform(
        system=platform.system(),
        machine=platform.machine(),
        libc=libc,
        libc_version=libc_version,
        python=tuple(sys.version_info[:2]),
        python_path=sys.executable or "python3",
    )


# --- torch build -----------------------------------------------------------------------------------------------


class TorchBuild(NamedTuple):
    """A build of the pinned torch: its local version label and the lowest NVIDIA driver it runs on."""

    name: str  # "cpu", "cu126", ...
    cuda: str  # "" for the CPU build, else "12.6", ...
    min_driver: int  # lowest driver branch (0 for the CPU build)
    note: str


# The builds PyTorch publishes for torch 2.13 on Linux x86_64 (its RELEASE.md: stable CUDA 12.6 and 13.0,
# experimental 13.2; no 12.8). Driver floors: CUDA 13.x needs driver 580+, 12.x needs 525+ (minor-version
# compatibility). PyPI's plain Linux torch 2.13.0 is the cu130 build (it depends on cuda-toolkit 13.0.3).
TORCH_BUILDS = {
    "cpu": TorchBuild("cpu", "", 0, "no CUDA"),
    "cu126": TorchBuild("cu126", "12.6", 525, "also for Maxwell, Pascal and Volta GPUs"),
    "cu130": TorchBuild("cu130", "13.0", 580, "PyPI's default Linux build; Turing and newer"),
    "cu132": TorchBuild("cu132", "13.2", 580, "experimental in PyTorch; Turing and newer"),
}
TORCH_CHOICES = ("auto",) + tuple(TORCH_BUILDS)


class TorchChoiceError(ValueError):
    """A ``TORCH`` value that names no build."""


def choose_torch_build(requested: str, driver_version: Optional[str]) -> Tuple[TorchBuild, str]:
    """The build for ``TORCH=requested`` on a machine whose NVIDIA driver is ``driver_version`` (None: none).

    Returns the build and a short reason. ``auto``: no driver -> cpu; driver 580+ -> cu130; 525-579 -> cu126;
    older -> cpu. An explicit build is taken as asked (a venv may be built for another machine's GPU).
    """
    value = (requested or "auto").strip().lower()
    if value in TORCH_BUILDS:
        return TORCH_BUILDS[value], "TORCH=" + value
    if value != "auto":
        raise TorchChoiceError(
            "TORCH={!r} is not a build of torch {}: use one of {}.".format(
                requested, torch_version(), ", ".join(TORCH_CHOICES)
            )
        )
    if driver_version is None:
        return TORCH_BUILDS["cpu"], "TORCH=auto: no NVIDIA driver found"
    branch = _version(driver_version)[:1]
    if not branch:  # a driver answered without a readable version: PyPI's default CUDA build
        return TORCH_BUILDS["cu130"], "TORCH=auto: NVIDIA driver of unknown version"
    for name in ("cu130", "cu126"):
        if branch[0] >= TORCH_BUILDS[name].min_driver:
            return TORCH_BUILDS[name], f"TORCH=auto: NVIDIA driver {driver_version}"
    return TORCH_BUILDS[
        "cpu"
    ], f"TORCH=auto: NVIDIA driver {driver_version} is older than 525, which CUDA 12 needs"


def driver_version_from_proc(text: str) -> str:
    """The driver version in the text of /proc/driver/nvidia/version ("" if it names none)."""
    found = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+(?:\.\d+)+)", text)
    return found.group(1) if found else ""


def detect_nvidia_driver() -> Optional[str]:
    """The NVIDIA driver's version ("" when present but unreadable), or None where no driver answers."""
    proc = Path("/proc/driver/nvidia/version")
    if proc.exists():
        return driver_version_from_proc(proc.read_text(errors="replace"))
    smi = shutil.which("nvidia-smi")  # WSL 2 has nvidia-smi but no /proc/driver/nvidia
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                timeout=20,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        lines = out.stdout.split()
        return lines[0] if out.returncode == 0 and lines else None
    return None


def torch_version(requirements: Path = RUNTIME_REQUIREMENTS) -> str:
    """The torch version pinned in requirements/runtime.txt (the one pin of torch)."""
    for line in requirements.read_text().splitlines():
        found = re.match(r"\s*torch\s*==\s*([0-9][^\s;#]*)", line)
        if found:
            return found.group(1)
    raise RuntimeError(f"no torch==VERSION line in {requirements}")


def torch_requirement(build: TorchBuild, version: str) -> str:
    """The pip requirement of ``build``: ``torch==2.13.0+cpu``, ``torch==2.13.0+cu126``, ..."""
    return f"torch=={version}+{build.name}"


def build_satisfied(build: TorchBuild, installed: Optional[str], version: str) -> bool:
    """Whether an installed torch version string is ``build`` of ``version`` (PyPI's plain one is cu130)."""
    if installed is None:
        return False
    if installed == version:  # PyPI's Linux x86_64 wheel, no local label
        return build.name == "cu130"
    return installed == f"{version}+{build.name}"


# --- installing (runs inside the new environment: sys.executable is its Python) ---------------------------------


def _pip(*args: str, quiet_errors: bool = False) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(
        [sys.executable, "-m", "pip", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE if quiet_errors else None,
        text=True,
    )


def installed_torch() -> Optional[str]:
    """The torch version installed in this environment, or None (read from metadata: torch is not imported)."""
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def resolved_from_configured_indexes(requirement: str) -> Optional[str]:
    """The torch version pip's own configuration (PyPI, a mirror, a wheel folder) resolves ``requirement`` to."""
    out = _pip(
        "install", "--dry-run", "--quiet", "--no-deps", "--ignore-installed", "--report", "-", requirement,
        quiet_errors=True,
    )  # fmt: skip
    if out.returncode != 0:
        return None
    try:
        return json.loads(out.stdout)["install"][0]["metadata"]["version"]
    except (ValueError, KeyError, IndexError):
        return None


def install_torch(requested: str) -> int:
    """Install the chosen torch build into this environment unless it is there; the exit code."""
    try:
        build, reason = choose_torch_build(requested, detect_nvidia_driver())
    except TorchChoiceError as exc:
        print("error: " + str(exc), file=sys.stderr)
        return 2
    version = torch_version()
    installed = installed_torch()
    label = "CPU" if build.name == "cpu" else "CUDA " + build.cuda
    if build_satisfied(build, installed, version):
        print(f"torch {installed} ({label}) is installed ({reason})")
        return 0
    requirement = torch_requirement(build, version)
    print(f"installing torch {version} build {build.name} ({label}, {reason})", flush=True)
    # First what pip is configured to use (PyPI, a mirror, a local wheel folder): PyPI's plain torch is the
    # cu130 build, a mirror may hold the others. Otherwise PyTorch's own index for that build.
    candidates = [requirement] + (["torch==" + version] if build.name == "cu130" else [])
    for candidate in candidates:
        found = resolved_from_configured_indexes(candidate)
        installable = found is not None and build_satisfied(build, found, version)
        if installable and _pip("install", "--quiet", f"torch=={found}").returncode == 0:
            return 0
    index = PYTORCH_INDEX + build.name
    if _pip("install", "--quiet", "--index-url", index, requirement).returncode == 0:
        return 0
    print(
        f"error: could not install {requirement} from pip's configured indexes nor from {index}",
        file=sys.stderr,
    )
    return 1


def main(argv: Optional[List[str]] = None) -> int:
    """Check this platform (and a ``TORCH`` value); with ``--install-torch`` install the chosen build."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--torch", help="also check this TORCH value and print the build it means here")
    parser.add_argument("--install-torch", metavar="TORCH", help="install this torch build into this Python")
    args = parser.parse_args(argv)
    if args.install_torch is not None:
        return install_torch(args.install_torch)
    problem = platform_problem(describe_platform())
    if problem:
        print("error: " + problem, file=sys.stderr)
        return 1
    if args.torch is not None:
        try:
            build, reason = choose_torch_build(args.torch, detect_nvidia_driver())
        except TorchChoiceError as exc:
            print("error: " + str(exc), file=sys.stderr)
            return 2
        print(f"platform ok; torch build {build.name} ({reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
