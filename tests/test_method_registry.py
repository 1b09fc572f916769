"""The method registry: the one place a method is known, and a method added
from outside the package."""

import os
import re

import jax
import numpy as np
import pytest

from smope_jax import compare, configuration, factory
from smope_jax import errors
from smope_jax.methods import published
from smope_jax.methods import registry
from tests import helpers
import toy_method

BUILT_IN = ("smope", "l2p", "deep_l2p", "dualprompt", "codaprompt", "vqprompt")


def test_built_in_methods_in_table_order():
  assert registry.names()[:len(BUILT_IN)] == BUILT_IN
  assert [registry.display_name(n) for n in BUILT_IN] == [
      "SMoPE", "L2P++", "Deep L2P++", "DualPrompt", "CODA-Prompt", "VQ-Prompt"
  ]
  assert registry.display_name("an_old_run") == "an_old_run"


def test_unknown_method_is_one_config_error():
  config = configuration.base_config()
  config.method = "nope"
  with pytest.raises(errors.ConfigError,
                     match=r"config.method='nope'; choose one of \('smope'"):
    configuration.validate(config)


def test_another_method_of_a_taken_name_is_refused():
  with pytest.raises(ValueError, match="'smope' is already registered"):
    registry.register(
        registry.MethodSpec(name="smope", display_name="Mine",
                            method_class=toy_method.ToyMethod))
  assert registry.register(toy_method.SPEC) is toy_method.SPEC  # Again: kept.


def test_no_module_outside_the_methods_names_a_method():
  quoted = re.compile("[\"'](" + "|".join(registry.names()) + ")[\"']")
  found = []
  for root, _, files in os.walk(os.path.join(helpers.REPO, "smope_jax")):
    if os.path.basename(root) == "methods":
      continue
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        with open(path) as f:
          found += [f"{path}: {m.group(0)}" for m in quoted.finditer(f.read())]
  assert not found


def test_published_numbers_name_registered_methods_and_known_sources():
  assert published.faa("imagenet_r", 10, "smope") == [(79.32, 0.42, "S")]
  assert published.faa("cifar100", 10, "dualprompt")[1] == (83.05, 1.16, "C")
  assert published.faa("cifar100", 10, "toy") == []
  for methods in published.FAA.values():
    assert set(methods) <= set(registry.names())
    for cells in methods.values():
      assert all(source in published.SOURCES for _, _, source in cells)


def test_docs_describe_every_built_in_method():
  with open(os.path.join(helpers.REPO, "docs", "methods.md")) as f:
    text = f.read()
  for name in BUILT_IN:
    assert registry.display_name(name) in text, name


def test_a_method_from_a_test_module_builds_and_runs():
  config = toy_method.get_config("method=toy")
  configuration.validate(config)
  assert config.prompt_length == 4  # Its protocol applied.
  model, method = factory.build_model(config, config.num_tasks)
  assert isinstance(method, toy_method.ToyMethod)
  params = factory.init_params(config, model, method)
  assert params["prompts"]["prompts"].shape == (1, 4, 16)
  images = np.zeros((2, 16, 16, 3), np.float32)
  out = model.apply({"params": params}, images, method.init_context(),
                    mode="eval")
  assert out["logits"].shape == (2, config.num_classes)
  assert np.isfinite(np.asarray(out["logits"])).all()
  assert compare.method_label({
      "method": "toy",
      "joint": False
  }) == ("Toy prompt")


def _run(module, *args):
  result = helpers.run_module(module, *args, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


@pytest.mark.slow
def test_a_method_from_a_test_module_runs_through_main_benchmark_compare(
    tmp_path):
  _run("main", "--config=tests/toy_method.py:method=toy",
       f"--workdir={tmp_path}/runs/toy")
  _run("main", "--config=tests/toy_method.py",
       f"--workdir={tmp_path}/runs/smope")
  bench = _run("benchmark", "--config=tests/toy_method.py", "--methods=toy",
               "--batch=4", "--repeats=1", "--warmup=0",
               "--matmul_size=64").stdout
  assert "| toy_inference |" in bench and "| toy_train |" in bench
  assert "| Toy prompt |" in bench
  record = compare.compare(
      [str(tmp_path / "runs" / "toy"),
       str(tmp_path / "runs" / "smope")], str(tmp_path / "out"))
  labels = [row["label"] for row in record["benchmarks"][0]["rows"]]
  assert labels == ["SMoPE", "Toy prompt"]
  assert os.path.isfile(tmp_path / "out" / "comparison.png")


def _docs_table_rows():
  with open(os.path.join(helpers.REPO, "docs", "methods.md")) as f:
    lines = f.read().splitlines()
  start = lines.index("| `config.method` | method | prompted blocks | "
                      "learnable prompt parameters (ViT-B/16) |")
  rows = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    cells = [c.strip() for c in line.strip("|").split("|")]
    rows.append((cells[0].strip("`"), int(cells[3].split()[0].replace(",",
                                                                      ""))))
  return rows


def test_docs_method_table_is_the_registry_with_true_counts():
  """docs/methods.md's table: every built-in method in the registry's order,
  with the prompt parameters its CIFAR-100 config builds (ViT-B/16)."""
  from configs import cifar100  # pylint: disable=g-import-not-at-top
  rows = _docs_table_rows()
  assert [name for name, _ in rows] == list(BUILT_IN)
  for name, count in rows:
    config = cifar100.get_config(f"method={name}")
    config.pretrained = ""
    model, method = factory.build_model(config, 10)
    shapes = factory.param_shapes(config, model, method)["prompts"]
    assert sum(
        int(np.prod(s.shape))
        for s in jax.tree_util.tree_leaves(shapes)) == count, name
