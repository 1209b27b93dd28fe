"""Packaging and the command line: subpackages import under their fastdp.* names."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "name, folder", [("kernels", "kernels"), ("theory", "theory"), ("bench", "bench")]
)
def test_subpackages_import_under_fastdp_names(name, folder):
    module = importlib.import_module(f"fastdp.{name}")
    assert Path(module.__file__).resolve().parent == ROOT / folder


def test_pyproject_maps_every_subpackage_folder():
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {
        "fastdp": "fastdp",
        "fastdp.kernels": "kernels",
        "fastdp.theory": "theory",
        "fastdp.bench": "bench",
    }
    listed = set(config["packages"])
    for folder, package in [
        ("fastdp", "fastdp"),
        ("kernels", "fastdp.kernels"),
        ("theory", "fastdp.theory"),
        ("bench", "fastdp.bench"),
    ]:
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            assert ".".join((package, *parts)) in listed, f"{init} is not shipped"


def test_no_top_level_imports_of_mapped_folders():
    offenders = []
    for path in ROOT.rglob("*.py"):
        if any(part.startswith(".") for part in path.relative_to(ROOT).parts):
            continue
        for line in path.read_text().splitlines():
            stripped = line.strip()
            for top in ("kernels", "theory", "bench"):
                if stripped.startswith((f"import {top}", f"from {top} ", f"from {top}.")):
                    offenders.append(f"{path}: {stripped}")
    assert not offenders


def test_cli_lists_commands_and_rejects_unknown():
    from fastdp.cli import main

    assert main([]) == 0
    assert main(["nonsense"]) == 2


def test_console_script_help_runs():
    result = subprocess.run(
        [sys.executable, "-m", "fastdp.cli", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("demo", "bench", "theory", "experiment"):
        assert command in result.stdout


def test_demo_quick_runs_end_to_end(tmp_path):
    from fastdp.demo import main

    assert main(["--quick", "--epochs", "1", "--samples", "600", "--out", str(tmp_path)]) == 0
    import json

    results = json.loads((tmp_path / "results.json").read_text())
    assert 0 < results["private"]["epsilon"] < float("inf")
    assert 0.0 <= results["private"]["test_accuracy"] <= 1.0
