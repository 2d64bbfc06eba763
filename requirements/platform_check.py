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
build the driver can run where one does; ``cpu``, ``cu126``, ``cu130`` and ``cu132`` choose one. ``system``
installs none: the environment is created with ``--system-site-packages`` and reuses the torch of the Python that
creates it (an NGC PyTorch or cloud image), once ``system_torch_problem`` finds it importable, of a supported
version (``SYSTEM_TORCH_RANGE``) and says whether it has CUDA; it also says where the numpy or the Python beside
that torch conflicts with the tritonserver stub. The pure functions (``platform_problem``, ``choose_torch_build``,
``torch_requirement``, ``system_torch_problem``) take descriptions, so the tests feed them fake machines;
``main()`` reads the real one.
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
#: ``TORCH=system``: no torch is installed; the environment reuses the one of the Python that creates it.
SYSTEM = "system"
TORCH_CHOICES = ("auto",) + tuple(TORCH_BUILDS) + (SYSTEM,)


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


# --- TORCH=system: the torch already installed on the host ------------------------------------------------------

# What a Python reports about its numpy and torch (run in that Python, so that a broken torch cannot stop this one).
_PROBE = """
import json, sys
info = {"python": list(sys.version_info[:2]), "executable": sys.executable}
try:
    import numpy
    info["numpy"] = numpy.__version__
except Exception:
    info["numpy"] = None
try:
    import torch
except Exception as exc:
    info["error"] = "{}: {}".format(type(exc).__name__, (str(exc).strip().splitlines() or [""])[-1])
else:
    available = torch.cuda.is_available()
    info.update(
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cuda_available=available,
        gpus=torch.cuda.device_count() if available else 0,
        gpu_name=torch.cuda.get_device_name(0) if available else None,
        path=torch.__file__,
    )
print(json.dumps(info))
"""

# The numpy the tritonserver stub needs (requirements/runtime.txt pins 1.26.4): numpy 2 corrupts BYTES tensors.
STUB_NUMPY_BELOW = (2,)


def system_torch_range(pinned: str) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """The torch versions ``TORCH=system`` accepts: from the pin's minor version (runtime.txt, the version the
    engine and its parity tests run on; older ones lack nothing known but are not tested) up to, not including,
    the next major version."""
    major, minor = _version(pinned)[:2]
    return (major, minor), (major + 1,)


def system_torch_problem(info: dict, pinned: str) -> Tuple[Optional[str], List[str]]:
    """Whether the system torch described by ``info`` (what ``_PROBE`` prints) can serve: the one sentence that
    says why not (None if it can), and the notes to print (its CUDA, a numpy the venv replaces)."""
    python = info.get("executable") or "python3"
    low, high = PYTHON_RANGE
    version = tuple(info.get("python") or ())
    if version and not low <= version <= high:
        return (
            f"TORCH=system reuses the packages of {python}, in whose Python the tritonserver stub then runs the "
            f"models, and the stubs of nvidia-pytriton cover Python 3.8 to 3.13 (this project needs 3.10+), but it "
            f"is Python {_dotted(version)}: use TORCH=auto, or `PYTHON=` a Python 3.10 to 3.13 that has torch.",
            [],
        )
    if info.get("error"):
        return (
            f"TORCH=system needs a torch that {python} imports, but `import torch` failed ({info['error']}): "
            f"install torch for that Python, run `make setup TORCH=system PYTHON=<the Python that has torch>`, "
            f"or use TORCH=auto.",
            [],
        )
    torch, (lowest, above) = info.get("torch") or "?", system_torch_range(pinned)
    if not lowest <= _version(torch)[:2] < above:
        return (
            f"TORCH=system needs torch {_dotted(lowest)} or a newer {lowest[0]}.x (this project pins {pinned} and "
            f"is tested on it), but {python} has torch {torch}: use TORCH=auto to install the pinned build.",
            [],
        )
    if not info.get("cuda"):
        notes = [f"torch {torch} of {python} is a CPU build: the engine and the server will run on the CPU"]
    elif not info.get("cuda_available"):
        notes = [
            f"torch {torch} of {python} is a CUDA {info['cuda']} build but sees no GPU (no driver, or "
            f"CUDA_VISIBLE_DEVICES hides them): the engine and the server will run on the CPU"
        ]
    else:
        notes = [
            f"torch {torch} of {python}: CUDA {info['cuda']}, {info.get('gpus')} GPU(s), {info.get('gpu_name')}"
        ]
    numpy = info.get("numpy")
    if numpy and _version(numpy)[:1] >= STUB_NUMPY_BELOW:
        notes.append(
            f"numpy {numpy} is installed beside that torch, but the Python-backend stub of tritonserver 2.51 "
            f"corrupts BYTES tensors under numpy 2: .venv gets the pinned numpy<2 of requirements/runtime.txt "
            f"over it, and a system package built for numpy 2 only will not import inside .venv"
        )
    return None, notes


def probe_python(python: str) -> dict:
    """What ``python`` reports about its numpy and torch (``_PROBE``); ``{"error": ...}`` if it cannot say."""
    try:
        out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.SubprocessError) as exc:
        return {"executable": python, "error": f"{type(exc).__name__}: {exc}"}
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"executable": python, "error": last}


def venv_without_system_packages(prefix: str) -> bool:
    """Whether the environment at ``prefix`` was created without ``--system-site-packages`` (its pyvenv.cfg)."""
    cfg = Path(prefix) / "pyvenv.cfg"
    if not cfg.is_file():
        return False
    found = re.search(r"include-system-site-packages\s*=\s*(\w+)", cfg.read_text())
    return bool(found) and found.group(1).lower() != "true"


def check_system_torch(python: str) -> int:
    """Print the verdict on the torch ``python`` imports (``TORCH=system``); 0 if it can serve, else 1."""
    if sys.prefix != sys.base_prefix and venv_without_system_packages(sys.prefix):
        print(
            f"error: TORCH=system reuses the system's torch through --system-site-packages, but {sys.prefix} was "
            "created without them: run `make clean`, then `make setup TORCH=system`.",
            file=sys.stderr,
        )
        return 1
    problem, notes = system_torch_problem(probe_python(python), torch_version())
    if problem:
        print("error: " + problem, file=sys.stderr)
        return 1
    for note in notes:
        print(("warning: " if note.startswith("numpy") else "") + note)
    return 0


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
    """Install the chosen torch build into this environment unless it is there; the exit code. ``system``
    installs nothing: it checks the torch this environment sees through its system site-packages."""
    if (requested or "").strip().lower() == SYSTEM:
        return check_system_torch(sys.executable)
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
    if args.torch is not None and args.torch.strip().lower() == SYSTEM:
        code = check_system_torch(sys.executable)
        if code == 0:
            print("platform ok; torch: the system's (TORCH=system)")
        return code
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
