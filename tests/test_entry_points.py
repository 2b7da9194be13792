"""Installable entry points: `python -m pregated_jax.<name>`, the console scripts and package data in
pyproject.toml, the shipped configs folder, and --help showing defaults."""

import glob
import importlib
import runpy
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pregated_jax.train.config import config_from_gin, configs_dir, find_config_file

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# `python -m` name -> the console script that runs the same main()
PROGRAMS = {"pregated_jax.infer": "pregated-infer", "pregated_jax.train": "pregated-train",
            "pregated_jax.evaluate": "pregated-evaluate", "pregated_jax.benchmark": "pregated-benchmark",
            "pregated_jax.export_hf": "pregated-export-hf", "pregated_jax.quantize": "pregated-quantize",
            "pregated_jax.convert_t5x": "pregated-convert-t5x"}


def _help(module: str, monkeypatch, capsys) -> str:
    """`python -m module --help`, run in this process; its output."""
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("module", sorted(PROGRAMS))
def test_module_entry_point_runs_main_and_help_shows_defaults(module, monkeypatch, capsys):
    text = _help(module, monkeypatch, capsys)
    assert text.startswith("usage: ")
    expected = {"pregated_jax.infer": "beam width (1: greedy) (default: 1)",
                "pregated_jax.evaluate": "(default: 32)",
                "pregated_jax.benchmark": "(default: 900)",
                "pregated_jax.quantize": "default 128",
                "pregated_jax.convert_t5x": "(default)",
                "pregated_jax.export_hf": "--dtype",
                "pregated_jax.train": "--gin_search_paths"}[module]
    assert expected in " ".join(text.split())


def test_console_scripts_name_each_program_main():
    scripts = PYPROJECT["project"]["scripts"]
    assert sorted(scripts) == sorted(PROGRAMS.values())
    for module, script in PROGRAMS.items():
        target_module, _, attr = scripts[script].partition(":")
        main = getattr(importlib.import_module(target_module), attr)
        assert callable(main)
        # `python -m module` runs the same function
        shim = importlib.import_module(module if module != "pregated_jax.train" else "pregated_jax.train.__main__")
        assert shim.main is main


def test_python_dash_m_runs_in_a_fresh_process(tmp_path):
    """The shim works outside pytest's process too (from another working directory)."""
    proc = subprocess.run([sys.executable, "-m", "pregated_jax.infer", "--num_beams", "0"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--num_beams must be >= 1, got 0" in proc.stderr


def test_every_python_folder_is_a_listed_package():
    packages = set(PYPROJECT["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "pregated_jax").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert on_disk <= packages, f"not in pyproject's packages: {sorted(on_disk - packages)}"
    assert PYPROJECT["tool"]["setuptools"]["package-dir"] == {"pregated_jax.configs": "configs"}
    assert "pregated_jax.configs" in packages


@pytest.mark.parametrize("package, folder, within", [("pregated_jax", "pregated_jax", "assets"),
                                                      ("pregated_jax.configs", "configs", "")])
def test_package_data_covers_every_shipped_file(package, folder, within):
    """The package-data globs of pyproject.toml match every file of the built-in model, the bundled data and
    the configs (as setuptools applies them: relative to the package's folder)."""
    base = ROOT / folder
    matched = {Path(f) for pattern in PYPROJECT["tool"]["setuptools"]["package-data"][package]
               for f in glob.glob(str(base / pattern), recursive=True) if Path(f).is_file()}
    wanted = {p for p in (base / within).rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert wanted and wanted <= matched, sorted(str(p) for p in wanted - matched)
    if package == "pregated_jax":
        assert base / "assets/default_model/model.safetensors" in matched
        assert base / "assets/t5_vocab/spiece.model" in matched
    else:
        assert base / "tiny.gin" in matched and base / "finetune/models/base8.gin" in matched


def test_config_files_resolve_against_the_shipped_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nowhere near the configs
    assert configs_dir() == ROOT / "configs"
    assert find_config_file("tiny.gin") == ROOT / "configs/tiny.gin"
    assert find_config_file("configs/tiny.py") == ROOT / "configs/tiny.py"
    cfg, _ = config_from_gin(["finetune/xsum_base8.gin"])  # its includes resolve too
    assert cfg.data.task == "xsum" and cfg.model.preset == "switch-base-8"
    with pytest.raises(FileNotFoundError, match=r"config file 'nope\.gin' not found; looked for nope\.gin, "):
        find_config_file("nope.gin")
