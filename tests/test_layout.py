"""The layout rules of docs/architecture.md, checked on the source tree.

* the product (``src/``, ``client/``, ``model_repository/``) never imports the harness (``load_tests``, ``tests``);
* the product's distribution (``pyproject.toml``, what ``make setup`` installs) holds the product's packages only,
  and the harness is its own distribution (``load_tests/pyproject.toml``, installed by ``make setup-dev``);
* the harness stays readable: no function in ``load_tests/`` reaches 60 lines;
* the network modules of the engine call no private oneDNN operator (those live in one kernel module);
* no regular expression edits a Triton model configuration (configs go through Triton's protobuf schema).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]
PRODUCT_DIRS = ("src", "client", "model_repository")
PRODUCT_PACKAGES = {"ofa_captioning", "ofa_serving", "ofa_eval", "client"}
HARNESS_PACKAGES = {"load_tests", "tests"}
MAX_HARNESS_FUNCTION_LINES = 60


def python_files(*folders: str) -> list[Path]:
    """The tracked-looking Python files under ``folders`` (caches left out)."""
    files = [p for folder in folders for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts]
    assert files, f"no Python file under {folders}"
    return sorted(files)


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, module)`` for each import statement of ``path`` (relative imports are the package's own)."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def test_the_product_never_imports_the_harness():
    offenders = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in python_files(*PRODUCT_DIRS)
        for line, module in imported_modules(path)
        if module.split(".")[0] in HARNESS_PACKAGES
    ]
    assert offenders == []


#: The project packages each part of the product may import besides its own (docs/architecture.md's table).
ALLOWED_IMPORTS = {
    "src/ofa_captioning": set(),
    "src/ofa_serving": {"ofa_captioning"},
    "src/ofa_eval": {"client", "ofa_captioning"},
    "client": set(),
    "model_repository": {"ofa_serving", "ofa_captioning"},
}
PROJECT_PACKAGES = PRODUCT_PACKAGES | HARNESS_PACKAGES


@pytest.mark.parametrize("folder", sorted(ALLOWED_IMPORTS))
def test_each_part_of_the_product_imports_only_what_the_layout_allows(folder):
    own = Path(folder).name
    offenders = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in python_files(folder)
        for line, module in imported_modules(path)
        if module.split(".")[0] in PROJECT_PACKAGES - {own} - ALLOWED_IMPORTS[folder]
    ]
    assert offenders == []


def test_the_harness_finds_no_stale_package_names():
    """The test kit and the server helpers live in ``load_tests``; their old homes are gone for good."""
    gone = {"ofa_testkit", "ofa_serving.testing", "ofa_captioning.memory", "ofa_serving.platform_check"}
    offenders = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in python_files(*PRODUCT_DIRS, "load_tests", "tests")
        for line, module in imported_modules(path)
        if module in gone or module.split(".")[0] in gone
    ]
    assert offenders == []


def test_make_setup_installs_the_product_and_setup_dev_the_harness():
    product = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    harness = tomllib.loads((REPO / "load_tests" / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(product["packages"]) == PRODUCT_PACKAGES
    assert {p.split(".")[0] for p in harness["packages"]} == {"load_tests"}
    makefile = (REPO / "Makefile").read_text()
    runtime_recipe = makefile.split("$(RUNTIME_STAMP):", 1)[1].split("\n\n", 1)[0]
    dev_recipe = makefile.split("$(DEV_STAMP):", 1)[1].split("\n\n", 1)[0]
    assert "-e load_tests" not in runtime_recipe and "-e load_tests" in dev_recipe


def test_the_installed_product_distribution_holds_no_harness():
    """What ``make setup`` put into the environment: the product distribution's top-level packages."""
    from importlib import metadata

    try:
        product = metadata.distribution("ofa-captioning-triton")
    except metadata.PackageNotFoundError:
        pytest.skip("the product is not installed in this environment (make setup installs it)")
    top_level = set((product.read_text("top_level.txt") or "").split())
    assert top_level == PRODUCT_PACKAGES


def function_lengths(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.end_lineno - node.lineno + 1, node.name


def test_no_function_of_the_harness_reaches_60_lines():
    too_long = [
        f"{path.relative_to(REPO)}: {name} has {lines} lines"
        for path in python_files("load_tests")
        for lines, name in function_lengths(path)
        if lines >= MAX_HARNESS_FUNCTION_LINES
    ]
    assert too_long == []


def module_level_imports(path: Path) -> Iterator[str]:
    """Modules imported when ``path`` is imported (its top-level statements; imports inside functions wait)."""
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_the_locustfile_needs_only_the_client_and_the_corpus():
    """The Locust image (docker/locust/Dockerfile) has the checkout on its path but not the product's server
    packages: importing the locustfile must reach only ``client`` and light ``load_tests`` modules."""
    seen: set[str] = set()
    reached: set[str] = set()
    todo = [REPO / "load_tests" / "locustfile.py"]
    while todo:
        path = todo.pop()
        for module in module_level_imports(path):
            reached.add(module.split(".")[0])
            if module.startswith("load_tests.") and module not in seen:
                seen.add(module)
                todo.append(REPO / (module.replace(".", "/") + ".py"))
    assert "load_tests.corpus" in seen and "client" in reached
    assert not reached & {"ofa_serving", "ofa_captioning", "ofa_eval", "torch"}


def test_the_architecture_page_names_every_module():
    """docs/architecture.md shows the tree as it is: every module of the product and the harness has its line."""
    page = (REPO / "docs" / "architecture.md").read_text()
    missing = [
        str(path.relative_to(REPO))
        for path in python_files("src", "client", "load_tests")
        if path.stem not in ("__init__", "__main__")
        and f"`{path.stem}`" not in page
        and f"`{path.parent.name}.{path.stem}`" not in page
    ]
    assert missing == []


def test_no_regular_expression_edits_a_model_configuration():
    """Configs change through ``ofa_serving.model_config`` (Triton's ModelConfig message), never by substitution:
    no product module that handles ``config.pbtxt`` calls a regular expression's ``sub``."""
    handlers = [p for p in python_files(*PRODUCT_DIRS) if "pbtxt" in p.read_text()]
    assert REPO / "src" / "ofa_serving" / "model_config.py" in handlers
    offenders = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for path in handlers
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr in ("sub", "subn")
    ]
    assert offenders == []
