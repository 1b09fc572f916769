"""The package installs with its console scripts and data, from anywhere.

The install test builds a wheel-installed copy in a virtual environment that
sees this environment's packages (a fresh one would download TensorFlow and
JAX again), then runs the scripts and the README's Python API from another
directory. Marked slow.
"""

import os
import re
import subprocess
import sys
import tomllib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _requirements(name):
  with open(os.path.join(REPO, name)) as f:
    return [line.strip() for line in f
            if line.strip() and not line.startswith(("#", "-r"))]


def _pyproject():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]


def test_pyproject_and_requirements_agree():
  project = _pyproject()
  assert project["dependencies"] == _requirements("requirements.txt")
  assert project["optional-dependencies"]["test"] == _requirements(
      "requirements-test.txt")
  assert project["optional-dependencies"]["data"] == _requirements(
      "requirements-data.txt")
  assert set(project["scripts"]) == {"smope-train", "smope-benchmark",
                                     "smope-convert", "smope-compare"}
  assert not any("torch" in r for r in _requirements("requirements-test.txt"))


def _readme_python_api() -> str:
  with open(os.path.join(REPO, "README.md")) as f:
    text = f.read()
  section = text[text.index("## Python API"):]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_install_scripts_and_api_from_another_directory(tmp_path):
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages",
                  str(venv)], check=True)
  python, bin_dir = venv / "bin" / "python", venv / "bin"
  subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                  "--no-deps", "--no-build-isolation", REPO], check=True,
                 cwd=tmp_path, timeout=600)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  for script in ("smope-train", "smope-benchmark", "smope-convert",
                 "smope-compare"):
    result = subprocess.run([str(bin_dir / script), "--help"], cwd=elsewhere,
                            env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, (script, result.stderr[-2000:])
  # The configs resolve from the installed package, from any directory.
  result = subprocess.run(
      [str(bin_dir / "smope-train"), "--config=configs/demo.py",
       "--config.epochs=0", f"--workdir={tmp_path / 'run'}"], cwd=elsewhere,
      env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and "config.epochs" in result.stderr
  # The README's Python API example, as a script, outside the checkout.
  script = elsewhere / "api.py"
  script.write_text(_readme_python_api())
  result = subprocess.run([str(python), str(script)], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  # The packaged ImageNet-R lists came along.
  result = subprocess.run(
      [str(python), "-c", "from smope_jax.data import imagenet_r; "
       "print(len(imagenet_r.listed_files('train')))"], cwd=elsewhere,
      env=env, capture_output=True, text=True, timeout=120)
  assert result.stdout.strip() == "24000", result.stderr[-2000:]
