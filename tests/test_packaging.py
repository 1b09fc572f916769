"""The package installs with its console scripts and data, from anywhere.

The install test builds and installs the package (without its dependencies,
which this environment has; a fresh environment would download TensorFlow
and JAX again) into a prefix of its own, then runs the scripts and the
README's Python API from another directory. Marked slow.
"""

import os
import re
import subprocess
import sys
import tomllib

import pytest

import smope_jax
from tests import helpers


def _requirements(name):
  with open(os.path.join(helpers.REPO, name)) as f:
    return [
        line.strip()
        for line in f
        if line.strip() and not line.startswith(("#", "-r"))
    ]


def _pyproject():
  with open(os.path.join(helpers.REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)["project"]


def test_pyproject_and_requirements_agree():
  project = _pyproject()
  assert project["dependencies"] == _requirements("requirements.txt")
  assert project["optional-dependencies"]["test"] == _requirements(
      "requirements-test.txt")
  assert project["optional-dependencies"]["data"] == _requirements(
      "requirements-data.txt")
  assert set(project["scripts"]) == {
      "smope-train", "smope-benchmark", "smope-convert", "smope-compare",
      "smope-preflight"
  }
  # The preflight extras are the compilers the preflight looks for.
  extras = project["optional-dependencies"]
  assert extras["preflight-tpu"] == ["libtpu==0.0.42.*"]
  assert [r.split(">")[0] for r in extras["preflight-gpu"]
         ] == ["jax-cuda12-plugin", "jax-cuda12-pjrt", "nvidia-cuda-nvcc-cu12"]
  assert not any("torch" in r for r in _requirements("requirements-test.txt"))


def test_package_version_is_the_project_version():
  assert smope_jax.__version__ == _pyproject()["version"]


def _readme_python_api() -> str:
  with open(os.path.join(helpers.REPO, "README.md")) as f:
    text = f.read()
  section = text[text.index("## Python API"):]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_install_scripts_and_api_from_another_directory(tmp_path):
  prefix = tmp_path / "prefix"
  subprocess.run([
      sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
      f"--prefix={prefix}", helpers.REPO
  ], check=True, cwd=tmp_path, timeout=600)
  python, bin_dir = sys.executable, prefix / "bin"
  site = prefix / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  # The installed copy only: not the checkout (another directory, no
  # PYTHONPATH to it); this environment provides the dependencies.
  env = dict(os.environ, PYTHONPATH=str(site))
  for script in ("smope-train", "smope-benchmark", "smope-convert",
                 "smope-compare", "smope-preflight"):
    result = subprocess.run([str(bin_dir / script), "--help"], cwd=elsewhere,
                            env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, (script, result.stderr[-2000:])
  # The GPU device descriptions ship with the package.
  specs = sorted(os.listdir(site / "smope_jax" / "preflight" / "gpu_specs"))
  assert specs == ["a100_sxm_40.txtpb", "a100_sxm_80.txtpb", "h100_sxm.txtpb"]
  # The configs resolve from the installed package, from any directory.
  result = subprocess.run([
      str(bin_dir / "smope-train"), "--config=configs/demo.py",
      "--config.epochs=0", f"--workdir={tmp_path / 'run'}"
  ], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and "config.epochs" in result.stderr
  # The README's Python API example, as a script, outside the checkout.
  script = elsewhere / "api.py"
  script.write_text(_readme_python_api())
  result = subprocess.run([python, str(script)], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  # The packaged ImageNet-R lists came along.
  result = subprocess.run([
      python, "-c", "from smope_jax.data import imagenet_r; "
      "print(len(imagenet_r.listed_files('train')))"
  ], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
  assert result.stdout.strip() == "24000", result.stderr[-2000:]


FORMATTED = ("smope_jax", "tests", "configs", "launch/prepare_data.py")


def test_the_tree_is_formatted_by_the_one_formatter():
  """yapf with pyproject.toml's settings leaves every source file as it is."""
  result = subprocess.run(
      [sys.executable, "-m", "yapf", "--diff", "-r", "-p", *FORMATTED],
      cwd=helpers.REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and not result.stdout, result.stdout[:3000]


def test_no_package_module_is_over_450_lines():
  long = {}
  for root, _, files in os.walk(os.path.join(helpers.REPO, "smope_jax")):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        with open(path) as f:
          count = sum(1 for _ in f)
        if count > 450:
          long[os.path.relpath(path, helpers.REPO)] = count
  assert not long
