"""An install that is not editable (a wheel, as on a cluster image) has everything a config needs: the presets."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_validate_works_from_an_installed_wheel(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO / "prism_ray", src / "prism_ray", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheels.glob("prism_ray-*.whl")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    script = ("import prism_ray, sys; from prism_ray.cli import main; print(prism_ray.__file__); "
              "sys.exit(main(['validate', '--set', 'recover.preset=prism', '--set', 'evaluate.recipe=sre2l', "
              "'--set', 'relabel.mix_group=64', '--set', 'baselines.recover={sre2l: {preset: sre2l}}']))")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    first, rest = run.stdout.split("\n", 1)
    assert first.startswith(str(target))  # the installed copy, not the source tree
    assert "loss: kl" in rest and "temperature: 20.0" in rest  # the sre2l student recipe came from the wheel
    assert "init: noise" in rest  # and the sre2l recover preset of the baseline
