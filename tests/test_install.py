# Run: python -m pytest -q tests/test_install.py
"""The install: `make run` announces its steps and lets pip show its progress, the repository names no
package index (pip is used as the machine configures it), and torch finds numpy (no "Failed to
initialize NumPy" on the first run)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_make_run_shows_its_steps_and_pips_progress(tmp_path):
    r = subprocess.run(["make", "-n", "run", f"VENV={tmp_path}/.venv"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    installs = [line for line in r.stdout.splitlines() if "pip install" in line]
    assert installs and all("--progress-bar on" in line and " -q" not in line for line in installs), installs
    assert "[1/2] installing torch" in r.stdout and "[2/2] installing deepseek-v2" in r.stdout


def test_no_package_index_is_written_into_the_repository():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    index = re.compile(r"(--(extra-)?index-url|index-url\s*=)\s*\S*https?://|download\.pytorch\.org|pypi\.org/simple")
    found = []
    for name in files:
        if name.endswith((".safetensors", ".png", ".json")) or not os.path.isfile(os.path.join(ROOT, name)):
            continue
        with open(os.path.join(ROOT, name), encoding="utf-8", errors="replace") as f:
            found += [f"{name}: {m.group(0)}" for m in index.finditer(f.read())]
    assert not found, found


def test_torch_finds_numpy():
    r = subprocess.run([sys.executable, "-c", "import torch; print(torch.zeros(2).numpy().sum())"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Failed to initialize NumPy" not in r.stderr, r.stderr
