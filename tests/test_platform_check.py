"""What ``make setup`` checks before it installs anything, and which torch build it installs.

The logic runs on fake machines (``Platform`` tuples, driver versions, a stand-in for pip); the file itself is
run by path as ``make setup`` runs it, with the standard library only.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

CHECK = Path(__file__).resolve().parents[1] / "requirements" / "platform_check.py"
_SPEC = importlib.util.spec_from_file_location("platform_check", CHECK)
pc = importlib.util.module_from_spec(_SPEC)
sys.modules["platform_check"] = pc  # dataclasses resolve their module by name
_SPEC.loader.exec_module(pc)
Platform = pc.Platform
TORCH = pc.torch_version()
GOOD = Platform("Linux", "x86_64", "glibc", "2.36", (3, 11), "/usr/bin/python3")


def one_sentence(message: str) -> str:
    assert message.startswith(pc.NEEDS)
    assert message.endswith(".") and ". " not in message, message
    return message


@pytest.mark.parametrize(
    "machine",
    [
        GOOD,
        GOOD._replace(libc_version="2.35"),  # Ubuntu 22.04: the oldest glibc of the wheel's tag
        GOOD._replace(python=(3, 10)),
        GOOD._replace(python=(3, 13)),
        GOOD._replace(machine="AMD64"),
    ],
)
def test_supported_linux_passes(machine):
    assert pc.platform_problem(machine) is None


@pytest.mark.parametrize(
    ("machine", "found", "remedy"),
    [
        (GOOD._replace(libc_version="2.31"), "this Linux has glibc 2.31", "Ubuntu 22.04, Debian 12"),
        (GOOD._replace(libc_version="2.4"), "glibc 2.4", "Fedora 36"),  # 2.4 < 2.35: compared as numbers
        (GOOD._replace(machine="aarch64"), "this Linux runs on aarch64", "use an x86_64 machine"),
        (GOOD._replace(libc="", libc_version=""), "no glibc was found", "Ubuntu 22.04"),
        (GOOD._replace(system="Darwin", machine="arm64"), "this is macOS on arm64", "a Linux x86_64 machine"),
        (
            GOOD._replace(system="Windows", machine="AMD64"),
            "this is Windows on AMD64",
            "WSL 2 with Ubuntu 22.04",
        ),
        (GOOD._replace(python=(3, 14)), "/usr/bin/python3 is Python 3.14", "make setup PYTHON=python3.12"),
        (GOOD._replace(python=(3, 9)), "/usr/bin/python3 is Python 3.9", "make setup PYTHON=python3.12"),
    ],
)
def test_unsupported_platform_gets_one_sentence(machine, found, remedy):
    message = one_sentence(pc.platform_problem(machine))
    assert found in message
    assert remedy in message


def test_the_sentence_gives_the_reason_of_the_failing_part():
    assert pc.WHY_PLATFORM in pc.platform_problem(GOOD._replace(libc_version="2.31"))
    python = pc.platform_problem(GOOD._replace(python=(3, 14)))
    assert pc.WHY_PYTHON in python
    assert pc.WHY_PLATFORM not in python


def test_the_operating_system_is_named_before_anything_else():
    # macOS has no glibc and may run an old Python: the OS is the problem to name.
    message = pc.platform_problem(Platform("Darwin", "arm64", "", "", (3, 9)))
    assert "this is macOS on arm64" in message
    assert "Python 3.9" not in message


@pytest.mark.parametrize(
    ("requested", "driver", "build"),
    [
        ("auto", None, "cpu"),  # no NVIDIA driver
        ("auto", "580.95.05", "cu130"),
        ("auto", "590.44.01", "cu130"),
        ("auto", "550.54.15", "cu126"),  # CUDA 12 runs on 525+, CUDA 13 needs 580+
        ("auto", "525.60.13", "cu126"),
        ("auto", "470.256.02", "cpu"),  # too old for any CUDA build of torch 2.13
        ("auto", "", "cu130"),  # a driver answered without a readable version: PyPI's default build
        ("", None, "cpu"),  # TORCH= (empty) is auto
        ("cpu", "580.95.05", "cpu"),  # an explicit build wins over the driver
        ("cu126", None, "cu126"),
        ("cu130", "550.54.15", "cu130"),
        (" CU132 ", None, "cu132"),
    ],
)
def test_torch_build_choice(requested, driver, build):
    chosen, reason = pc.choose_torch_build(requested, driver)
    assert chosen.name == build
    assert reason.startswith("TORCH=")


def test_auto_says_why_an_old_driver_gets_the_cpu_build():
    _, reason = pc.choose_torch_build("auto", "470.256.02")
    assert "470.256.02 is older than 525" in reason


@pytest.mark.parametrize("bad", ["cu128", "gpu", "cuda", "rocm", "cu13"])
def test_a_bad_torch_value_is_refused_with_the_choices(bad):
    with pytest.raises(pc.TorchChoiceError) as err:
        pc.choose_torch_build(bad, "580.95.05")
    assert (
        str(err.value)
        == f"TORCH={bad!r} is not a build of torch {TORCH}: use one of auto, cpu, cu126, cu130, cu132, system."
    )


def test_torch_requirement_and_what_satisfies_it():
    cpu, cu126, cu130 = (pc.TORCH_BUILDS[name] for name in ("cpu", "cu126", "cu130"))
    assert pc.torch_requirement(cpu, "2.13.0") == "torch==2.13.0+cpu"
    assert pc.torch_requirement(cu126, "2.13.0") == "torch==2.13.0+cu126"
    assert pc.build_satisfied(cpu, "2.13.0+cpu", "2.13.0")
    assert not pc.build_satisfied(cpu, "2.13.0", "2.13.0")  # PyPI's Linux wheel is the CUDA 13.0 build
    assert pc.build_satisfied(cu130, "2.13.0", "2.13.0")
    assert pc.build_satisfied(cu130, "2.13.0+cu130", "2.13.0")
    assert not pc.build_satisfied(cu130, "2.13.0+cu126", "2.13.0")
    assert not pc.build_satisfied(cpu, "2.12.0+cpu", "2.13.0")
    assert not pc.build_satisfied(cpu, None, "2.13.0")


def test_torch_version_is_the_runtime_pin(tmp_path):
    lines = (pc.RUNTIME_REQUIREMENTS).read_text().splitlines()
    assert f"torch=={TORCH}" in lines
    other = tmp_path / "r.txt"
    other.write_text("# torch==0.0 in a comment is no pin\ntorchvision==0.29.0\ntorch==2.14.1  # note\n")
    assert pc.torch_version(other) == "2.14.1"


@pytest.mark.parametrize(
    ("text", "version"),
    [
        (
            "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.95.05  Tue Sep 30 10:30:04 UTC 2025\n",
            "580.95.05",
        ),
        (
            "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  (dvs-builder)\n",
            "570.86.15",
        ),
        ("something else\n", ""),
    ],
)
def test_driver_version_from_proc(text, version):
    assert pc.driver_version_from_proc(text) == version


class FakePip:
    """Stands in for ``python -m pip``: what the configured indexes resolve to, which installs succeed."""

    def __init__(self, configured: dict[str, str], installable: set[tuple[str, ...]]):
        self.configured = configured  # requirement -> version resolved by a dry run
        self.installable = installable  # argument tuples of installs that succeed
        self.installs: list[tuple[str, ...]] = []

    def __call__(self, *args, quiet_errors=False):
        if "--dry-run" in args:
            version = self.configured.get(args[-1])
            report = {"install": [{"metadata": {"name": "torch", "version": version}}]}
            return subprocess.CompletedProcess(
                args, 0 if version else 1, json.dumps(report) if version else ""
            )
        self.installs.append(args)
        return subprocess.CompletedProcess(args, 0 if args in self.installable else 1, "")


def run_install(monkeypatch, requested, driver, installed, pip):
    monkeypatch.setattr(pc, "detect_nvidia_driver", lambda: driver)
    monkeypatch.setattr(pc, "installed_torch", lambda: installed)
    monkeypatch.setattr(pc, "_pip", pip)
    return pc.install_torch(requested)


def test_install_takes_the_cpu_wheel_from_the_configured_indexes_when_they_hold_it(monkeypatch):
    # e.g. a local wheel folder in pip's configuration, as on this project's build machines
    want = ("install", "--quiet", f"torch=={TORCH}+cpu")
    pip = FakePip({f"torch=={TORCH}+cpu": f"{TORCH}+cpu"}, {want})
    assert run_install(monkeypatch, "auto", None, None, pip) == 0
    assert pip.installs == [want]


def test_install_falls_back_to_pytorch_cpu_index(monkeypatch):
    # PyPI has no +cpu wheel: PyTorch's CPU index, never PyPI's CUDA build
    want = (
        "install",
        "--quiet",
        "--index-url",
        "https://download.pytorch.org/whl/cpu",
        f"torch=={TORCH}+cpu",
    )
    pip = FakePip({f"torch=={TORCH}": TORCH}, {want})
    assert run_install(monkeypatch, "cpu", "580.95.05", None, pip) == 0
    assert pip.installs == [want]


def test_install_takes_pypis_plain_torch_for_cuda_13_0(monkeypatch):
    want = ("install", "--quiet", f"torch=={TORCH}")
    pip = FakePip({f"torch=={TORCH}": TORCH}, {want})
    assert run_install(monkeypatch, "auto", "580.95.05", f"{TORCH}+cpu", pip) == 0
    assert pip.installs == [want]


def test_install_does_not_take_a_cpu_wheel_for_a_cuda_request(monkeypatch):
    # configured indexes that resolve torch==VERSION to the +cpu wheel: go to PyTorch's cu130 index
    want = (
        "install",
        "--quiet",
        "--index-url",
        "https://download.pytorch.org/whl/cu130",
        f"torch=={TORCH}+cu130",
    )
    pip = FakePip({f"torch=={TORCH}": f"{TORCH}+cpu"}, {want})
    assert run_install(monkeypatch, "cu130", None, None, pip) == 0
    assert pip.installs == [want]


def test_install_is_a_no_op_when_the_build_is_there(monkeypatch, capsys):
    pip = FakePip({}, set())
    assert run_install(monkeypatch, "auto", None, f"{TORCH}+cpu", pip) == 0
    assert pip.installs == []
    assert f"torch {TORCH}+cpu (CPU) is installed" in capsys.readouterr().out


def test_install_failure_names_both_places(monkeypatch, capsys):
    assert run_install(monkeypatch, "cu126", None, None, FakePip({}, set())) == 1
    err = capsys.readouterr().err
    assert f"could not install torch=={TORCH}+cu126" in err
    assert "https://download.pytorch.org/whl/cu126" in err


def test_install_refuses_a_bad_value_before_pip(monkeypatch, capsys):
    pip = FakePip({}, set())
    assert run_install(monkeypatch, "cu128", None, None, pip) == 2
    assert pip.installs == []
    assert "TORCH='cu128' is not a build" in capsys.readouterr().err


def test_runs_by_path_with_the_standard_library_only():
    # make setup runs it with the system python3 before any environment exists (-I: no site-packages, no
    # PYTHONPATH), and must get the sentence, not a SyntaxError, from Pythons as old as 3.6.
    tree = ast.parse(CHECK.read_text(), feature_version=(3, 6))
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported and imported <= set(sys.stdlib_module_names)
    bad = subprocess.run(
        [sys.executable, "-I", str(CHECK), "--torch", "cu128"], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 2
    assert "TORCH='cu128' is not a build of torch" in bad.stderr


# --- TORCH=system --------------------------------------------------------------------------------------------

NGC = {
    "python": [3, 12],
    "executable": "/usr/bin/python3",
    "numpy": "1.26.4",
    "torch": "2.13.0a0+ecf3bae40a.nv26.01",  # NGC PyTorch labels its builds as pre-releases
    "cuda": "13.0",
    "cuda_available": True,
    "gpus": 8,
    "gpu_name": "NVIDIA H100 80GB HBM3",
}


def one_system_sentence(message: str) -> str:
    assert message.startswith("TORCH=system ")
    assert message.endswith(".") and ". " not in message, message
    return message


@pytest.mark.parametrize("version", ["2.13.0a0+ecf3bae40a.nv26.01", "2.13.0", "2.13.1+cu126", "2.14.0"])
def test_system_torch_of_a_supported_version_with_cuda_passes(version):
    problem, notes = pc.system_torch_problem({**NGC, "torch": version}, "2.13.0")
    assert problem is None
    assert notes == [f"torch {version} of /usr/bin/python3: CUDA 13.0, 8 GPU(s), NVIDIA H100 80GB HBM3"]


@pytest.mark.parametrize("version", ["2.12.1", "2.6.0a0+df5bbc09d1.nv24.11", "3.0.0", "nonsense"])
def test_system_torch_outside_the_supported_range_is_refused_in_one_sentence(version):
    problem, _ = pc.system_torch_problem({**NGC, "torch": version}, "2.13.0")
    message = one_system_sentence(problem)
    assert f"has torch {version}" in message and "needs torch 2.13 or a newer 2.x" in message
    assert "use TORCH=auto" in message


def test_the_supported_range_follows_the_pin():
    assert pc.system_torch_range("2.13.0") == ((2, 13), (3,))
    assert pc.system_torch_problem({**NGC, "torch": "2.14.0"}, "2.15.0")[0] is not None


def test_a_python_without_torch_is_refused_with_what_to_do():
    info = {"python": [3, 11], "executable": "/usr/bin/python3", "numpy": None}
    problem, _ = pc.system_torch_problem(
        {**info, "error": "ModuleNotFoundError: No module named 'torch'"}, TORCH
    )
    message = one_system_sentence(problem)
    assert "/usr/bin/python3 imports" in message and "No module named 'torch'" in message
    assert "make setup TORCH=system PYTHON=" in message


@pytest.mark.parametrize("python", [[3, 14], [3, 9]])
def test_a_python_the_triton_stub_does_not_cover_is_refused(python):
    problem, _ = pc.system_torch_problem({**NGC, "python": python}, TORCH)
    message = one_system_sentence(problem)
    assert f"is Python {python[0]}.{python[1]}" in message and "stubs of nvidia-pytriton" in message


@pytest.mark.parametrize(
    ("cuda", "available", "said"),
    [(None, False, "is a CPU build"), ("12.6", False, "is a CUDA 12.6 build but sees no GPU")],
)
def test_a_system_torch_without_a_usable_gpu_passes_and_says_the_server_runs_on_the_cpu(
    cuda, available, said
):
    problem, notes = pc.system_torch_problem({**NGC, "cuda": cuda, "cuda_available": available}, TORCH)
    assert problem is None
    assert said in notes[0] and notes[0].endswith("will run on the CPU")


def test_numpy_2_beside_the_system_torch_is_named_with_the_stub_conflict():
    problem, notes = pc.system_torch_problem({**NGC, "numpy": "2.1.3"}, TORCH)
    assert problem is None
    assert notes[1].startswith("numpy 2.1.3 is installed beside that torch")
    assert "corrupts BYTES tensors under numpy 2" in notes[1] and "numpy<2" in notes[1]
    assert len(pc.system_torch_problem(NGC, TORCH)[1]) == 1  # numpy 1.26.4: nothing to say


def test_check_system_torch_prints_the_verdict(monkeypatch, capsys):
    monkeypatch.setattr(pc, "venv_without_system_packages", lambda prefix: False)
    monkeypatch.setattr(pc, "probe_python", lambda python: {**NGC, "numpy": "2.0.0"})
    assert pc.check_system_torch("/usr/bin/python3") == 0
    out = capsys.readouterr().out
    assert "NVIDIA H100 80GB HBM3" in out and "warning: numpy 2.0.0" in out
    monkeypatch.setattr(pc, "probe_python", lambda python: {**NGC, "torch": "2.5.1"})
    assert pc.check_system_torch("/usr/bin/python3") == 1
    assert capsys.readouterr().err.startswith("error: TORCH=system needs torch 2.13")


def test_a_venv_made_without_system_packages_is_refused_before_probing(monkeypatch, capsys, tmp_path):
    (tmp_path / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = false\n")
    assert pc.venv_without_system_packages(str(tmp_path))
    monkeypatch.setattr(pc.sys, "prefix", str(tmp_path))
    monkeypatch.setattr(pc.sys, "base_prefix", "/usr")
    monkeypatch.setattr(pc, "probe_python", lambda python: pytest.fail("probed"))
    assert pc.check_system_torch("python") == 1
    assert "make clean" in capsys.readouterr().err
    (tmp_path / "pyvenv.cfg").write_text("include-system-site-packages = true\n")
    assert not pc.venv_without_system_packages(str(tmp_path))


def test_install_torch_system_installs_nothing(monkeypatch):
    monkeypatch.setattr(pc, "check_system_torch", lambda python: 0)
    pip = FakePip({}, set())
    assert run_install(monkeypatch, "system", "580.95.05", None, pip) == 0
    assert pip.installs == []


def test_the_probe_reads_this_pythons_torch():
    info = pc.probe_python(sys.executable)
    import torch

    assert info["torch"] == torch.__version__ and info["python"] == list(sys.version_info[:2])
    assert info["cuda_available"] == torch.cuda.is_available()
