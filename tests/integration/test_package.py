"""The package as people install it: the wheel built from this tree holds the three packages, their PEP 561
markers and the license, states pyproject's license and dependency floors, and installs into a fresh venv
whose console script runs.

The fresh venv borrows this environment's installed dependencies through a ``.pth`` line (nothing is
downloaded); the wheel itself goes into the venv's own site-packages, which comes first on ``sys.path``.
"""

from __future__ import annotations

import email.parser
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.integration

PACKAGES = ("reranker", "jobs", "serve")
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
DIST_INFO = f"{PROJECT['name'].replace('-', '_')}-{PROJECT['version']}.dist-info"
# What a checkout holds that is not source: never copied to the build (a stale build/ would leak into it).
NOT_SOURCE = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".schemathesis")
OUTPUTS = ("out", "sample")  # the demo's outputs (gitignored)


def run(command: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``command`` without this session's PYTHONPATH (which points at the source tree); fails loudly."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The wheel pip builds from a copy of this tree, offline, with this environment's setuptools."""
    source = tmp_path_factory.mktemp("package") / "source"
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(*NOT_SOURCE, *OUTPUTS))
    out = source.parent / "wheelhouse"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    run([*command, "--quiet", "--wheel-dir", str(out), str(source)], cwd=source.parent)
    (built,) = out.glob("*.whl")
    yield built


def metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as archive:
        return email.parser.Parser().parsestr(archive.read(f"{DIST_INFO}/METADATA").decode())


def normalized(requirement: str) -> tuple[str, tuple[str, ...], str, str]:
    parsed = Requirement(requirement)
    marker = str(parsed.marker) if parsed.marker else ""
    return canonicalize_name(parsed.name), tuple(sorted(parsed.extras)), str(parsed.specifier), marker


def test_the_wheel_holds_the_three_packages_their_type_markers_and_the_license(wheel):
    """Every module of reranker / jobs / serve with its py.typed, the full Apache-2.0 text, the console
    script; nothing else at the top (no tests, bench, tools, configs)."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        license_text = archive.read(f"{DIST_INFO}/licenses/LICENSE").decode()
        entry_points = archive.read(f"{DIST_INFO}/entry_points.txt").decode()
    assert {name.split("/")[0] for name in names} == {*PACKAGES, DIST_INFO}
    for package in PACKAGES:
        assert f"{package}/py.typed" in names, package
        modules = {
            path.relative_to(REPO_ROOT).as_posix()
            for path in (REPO_ROOT / package).rglob("*.py")
            if "__pycache__" not in path.parts
        }
        assert modules == {name for name in names if name.startswith(f"{package}/") and name.endswith(".py")}
    assert license_text == (REPO_ROOT / "LICENSE").read_text()
    assert license_text.startswith("Copyright 2026 The ray-rerank authors\n")
    for line in ("Apache License", "Version 2.0, January 2004", "END OF TERMS AND CONDITIONS"):
        assert line in license_text
    assert "rerank-rescore = jobs.rescore:cli" in entry_points


def test_the_metadata_states_the_license_and_exactly_the_pyproject_requirements(wheel):
    """License-Expression and License-File as pyproject says; Requires-Dist equal to its dependencies and
    extras (so the floors are the ones pyproject states); sentence-transformers, which the core imports
    for model families, is a core requirement rather than an extra's."""
    meta = metadata(wheel)
    assert meta["License-Expression"] == PROJECT["license"] == "Apache-2.0"
    assert meta.get_all("License-File") == PROJECT["license-files"] == ["LICENSE"]
    expected = {normalized(dependency) for dependency in PROJECT["dependencies"]} | {
        normalized(f'{dependency}; extra == "{extra}"')
        for extra, dependencies in PROJECT["optional-dependencies"].items()
        for dependency in dependencies
    }
    assert {normalized(requirement) for requirement in meta.get_all("Requires-Dist")} == expected
    core = {name: specifier for name, _, specifier, marker in expected if not marker}
    assert core["sentence-transformers"] and core["ray"] and core["pyarrow"]


def test_the_wheel_installs_in_a_fresh_venv_and_its_console_script_runs(wheel, tmp_path):
    """Installed with --no-deps into a new venv (dependencies borrowed from this environment), the
    console script prints its usage, and ``import reranker`` is the installed copy, not the source tree."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(run([str(python), "-c", purelib], cwd=tmp_path).stdout.strip())
    borrowed = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site / "borrowed-dependencies.pth").write_text("".join(f"{path}\n" for path in borrowed))
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index"]
    run([*install, "--no-compile", "--quiet", str(wheel)], cwd=tmp_path)

    usage = run([str(venv / "bin" / "rerank-rescore"), "--help"], cwd=tmp_path)
    assert usage.stdout.startswith("usage:") and "--model" in usage.stdout

    probe = (
        "import importlib.metadata, json, jobs, reranker, serve; "
        "print(json.dumps({'files': [m.__file__ for m in (reranker, jobs, serve)], "
        "'version': importlib.metadata.version('ray-rerank')}))"
    )
    found = json.loads(run([str(python), "-c", probe], cwd=tmp_path).stdout)
    for file in found["files"]:
        assert Path(file).is_relative_to(site) and not Path(file).is_relative_to(REPO_ROOT), file
    assert found["version"] == PROJECT["version"]
