"""docs/security.md against the code, and the `docker run` examples of the docs and the Dockerfiles.

The CVE table of the docs must list every CVE the launcher knows (``ofa_serving.security.CVES``) with the same
fixed release, open on the local wheel and fixed in the image; every ``docker run`` example must publish its
ports on the host's loopback only.
"""

from __future__ import annotations

import re
import shlex

import pytest

from .deploylib import (
    DOCKER,
    MIN_PATCHED_RELEASE,
    NGC_TRITON_VERSION,
    REPO,
    WHEEL_TRITON_VERSION,
    base_image_release,
    parse_dockerfile,
    version_tuple,
)

SECURITY_DOC = REPO / "docs" / "security.md"
#: Files whose `docker run` examples must publish on loopback.
EXAMPLE_FILES = [
    DOCKER / "Dockerfile",
    DOCKER / "locust" / "Dockerfile",
    REPO / "docs" / "deployment.md",
    SECURITY_DOC,
    REPO / "README.md",
]


def cve_table() -> dict[str, list[str]]:
    """CVE id -> the cells of its row in docs/security.md's CVE table."""
    rows = {}
    for line in SECURITY_DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and re.fullmatch(r"CVE-\d{4}-\d+", cells[0]):
            rows[cells[0]] = cells
    return rows


def test_the_table_lists_every_cve_the_launcher_knows():
    from ofa_serving.security import CVES

    rows = cve_table()
    assert len(rows) >= len(CVES)
    release = base_image_release(parse_dockerfile(DOCKER / "Dockerfile"))
    for cve in CVES:
        assert cve.id in rows, f"{cve.id} is not in docs/security.md"
        what, cvss, fixed, image, wheel = rows[cve.id][1:6]
        assert fixed == f"{cve.fixed_release} ({cve.fixed_version})", f"{cve.id}: fixed in {fixed!r}"
        assert cvss == "not checked here" or re.fullmatch(r"\d+\.\d", cvss), f"{cve.id}: CVSS {cvss!r}"
        # The image's release is newer than every fix; the wheel's 2.51 older than every fix.
        assert version_tuple(release) >= version_tuple(cve.fixed_release) and image == "fixed", cve.id
        assert version_tuple(WHEEL_TRITON_VERSION) < version_tuple(cve.fixed_version) and wheel == "**open**"


def test_the_doc_names_the_runtimes_and_the_minimum():
    text = SECURITY_DOC.read_text()
    release = base_image_release(parse_dockerfile(DOCKER / "Dockerfile"))
    assert f"tritonserver:{release}-py3" in text and NGC_TRITON_VERSION[release] in text
    assert WHEEL_TRITON_VERSION in text and "nvidia-pytriton" in text
    assert f"{MIN_PATCHED_RELEASE} ({NGC_TRITON_VERSION[MIN_PATCHED_RELEASE]})" in text
    for bulletin in ("5687", "5734", "5816", "5828", "5848", "5853", "5865", "5875"):
        assert bulletin in text, f"NVIDIA bulletin {bulletin} is not cited"
    assert "/proc/<pid>/cmdline" in text, "say who can read the keys"


def docker_run_commands(text: str) -> list[str]:
    """Every `docker run ...` command of a text (comment markers and line continuations removed)."""
    lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines()]
    commands, current = [], None
    for line in lines:
        if current is not None:
            current += " " + line.strip().rstrip("\\")
            if not line.rstrip().endswith("\\"):
                commands.append(current)
                current = None
            continue
        m = re.match(r"\s*(?:\$\s*)?(docker run\b.*)", line)  # a command line, not prose that names one
        if m:
            current = m.group(1).rstrip("\\").strip()
            if not line.rstrip().endswith("\\"):
                commands.append(current)
                current = None
    return commands


def published(command: str) -> list[str]:
    """The values of -p / --publish of a docker run command."""
    tokens = shlex.split(command, comments=True)
    out = []
    for i, token in enumerate(tokens):
        if token in ("-p", "--publish"):
            out.append(tokens[i + 1] if i + 1 < len(tokens) else "")
        elif token.startswith(("--publish=", "-p=")):
            out.append(token.split("=", 1)[1])
        elif token == "-P" or token == "--publish-all":
            out.append("ALL")
    return out


def test_parser_finds_examples():
    text = "x\n#   docker run --gpus 1 \\\n#       -p 8000:8000 img\nprose names `docker run -p` here\n"
    (command,) = docker_run_commands(text)
    assert published(command) == ["8000:8000"]
    assert published("docker run -P img") == ["ALL"] and published("docker run --publish=1:1 img") == ["1:1"]


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_docker_run_examples_publish_on_loopback(path):
    if not path.is_file():
        pytest.skip(f"{path.name} does not exist")
    for command in docker_run_commands(path.read_text()):
        for value in published(command):
            assert value.startswith("127.0.0.1:"), (
                f"{path.name}: `{command}` publishes {value} beyond loopback"
            )


def test_the_server_examples_publish_their_ports():
    # The image's own example and the deployment guide's do publish (on loopback), so the check above has
    # something to check.
    for path in (DOCKER / "Dockerfile", REPO / "docs" / "deployment.md"):
        commands = [c for c in docker_run_commands(path.read_text()) if "ofa-captioning-triton" in c]
        assert commands, path.name
        assert all(published(c) == ["127.0.0.1:8000-8002:8000-8002"] for c in commands), commands
