"""The preflight: targets, the chip table, the roofline, the verdict and the
largest-batch search, and compiling real steps for TPU topologies.

Compiling needs libtpu (the `preflight-tpu` extra, which the test set-up
installs); those tests skip where it is missing.
"""

import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

from smope_jax.errors import UserError
from smope_jax.preflight import chips, devices, roofline
from smope_jax.preflight import report
from tests import helpers

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU,
                                  reason="the preflight-tpu extra is missing")


@pytest.mark.parametrize("name, chip, count, hosts, topology", [
    ("tpu:v5e-8", "v5e", 8, 1, "v5e:2x4"),
    ("tpu:v5litepod-8", "v5e", 8, 1, "v5e:2x4"),
    ("tpu:v5e-4", "v5e", 4, 1, "v5e:2x2"),
    ("tpu:v5litepod-16", "v5e", 16, 4, "v5e:4x4"),
    ("tpu:v4-8", "v4", 4, 1, "v4:2x2x1"),
    ("tpu:v4-32", "v4", 16, 4, "v4:2x2x4"),
    ("tpu:v5p-8", "v5p", 4, 1, "v5:2x2x1"),
    ("tpu:v6e-8", "v6e", 8, 1, "v6e:2x4"),
    ("gpu:h100x1", "h100", 1, 1, "1x1x1"),
    ("gpu:h100x8", "h100", 8, 1, "1x1x8"),
    ("gpu:a100-40gbx16", "a100-40gb", 16, 2, "1x2x8"),
    ("gpu:a100-80gbx12/3", "a100-80gb", 12, 3, "1x3x4"),
])
def test_targets(name, chip, count, hosts, topology):
  target = chips.parse_target(name)
  assert (target.chip, target.devices, target.hosts,
          target.topology) == (chip, count, hosts, topology)


@pytest.mark.parametrize("name, words", [
    ("tpu:v5e-3", "no v5e slice of that size"),
    ("tpu:v4-6", "no v4 slice of that size"),
    ("tpu:v9-8", "unknown TPU type"),
    ("gpu:rtx4090x1", "expected gpu:MODELxN"),
    ("gpu:h100x9", "do not split evenly"),
    ("gpu:h100x8/3", "do not split evenly"),
    ("cpu:1", "expected tpu:TYPE or gpu:MODELxN"),
])
def test_bad_targets(name, words):
  with pytest.raises(UserError, match=words):
    chips.parse_target(name)


def test_every_chip_figure_has_a_public_source():
  """Each entry of the table is preceded by a comment naming its source."""
  text = pathlib.Path(helpers.REPO, "smope_jax", "preflight",
                      "chips.py").read_text()
  table = text[text.index("CHIPS = {"):text.index("\n}\n")]
  for key in chips.CHIPS:
    entry = table.index(f'"{key}": _')
    comment = table[:entry].rstrip().rsplit("\n    \"", 1)[-1]
    assert re.search(r"cloud\.google\.com/tpu/docs/|NVIDIA .* datasheet",
                     comment), key
    chip = chips.CHIPS[key]
    for figure in (chip.memory_bytes //
                   chips.GIB if chip.platform == "tpu" else chip.memory_bytes //
                   10**9, chip.bf16_flops / 1e12):
      assert f"{figure:g}" in comment, (key, figure)


def test_peak_per_precision():
  v5e, h100 = chips.CHIPS["v5e"], chips.CHIPS["h100"]
  assert v5e.peak_flops("bfloat16", "highest") == 197e12
  assert v5e.peak_flops("float32", "default") == 197e12
  assert v5e.peak_flops("float32", "high") == pytest.approx(197e12 / 3)
  assert v5e.peak_flops("float32", "highest") == pytest.approx(197e12 / 6)
  assert h100.peak_flops("float32", "highest") == 67e12
  assert h100.peak_flops("float32", "default") == 495e12
  assert h100.peak_flops("bfloat16", "highest") == 989e12


def test_roofline_bound_and_utilization():
  chip = chips.CHIPS["v5e"]
  compute = roofline.bound(chip, 197e12, 819e9 / 2, dtype="bfloat16",
                           matmul_precision="highest")
  assert compute.seconds == pytest.approx(1.0)
  assert compute.memory_seconds == pytest.approx(0.5)
  assert compute.limited_by == "compute"
  memory = roofline.bound(chip, 1e12, 819e9 * 3, dtype="bfloat16",
                          matmul_precision="highest")
  assert memory.seconds == pytest.approx(3.0) and memory.limited_by == "memory"
  assert roofline.utilization(98.5e12, 1.0, chip, dtype="bfloat16",
                              matmul_precision="highest") == pytest.approx(0.5)


@pytest.mark.parametrize("kind, key", [("TPU v4", "v4"), ("TPU v5 lite", "v5e"),
                                       ("TPU v5", "v5p"),
                                       ("TPU v6 lite", "v6e"),
                                       ("NVIDIA H100 80GB HBM3", "h100"),
                                       ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
                                       ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
                                       ("cpu", None)])
def test_chip_of_device_kind(kind, key):
  assert roofline.chip_of(kind) is (chips.CHIPS[key] if key else None)


def test_collectives_of_combined_and_async_ops():
  from smope_jax.preflight import steps  # pylint: disable=g-import-not-at-top
  hlo = textwrap.dedent("""\
      %all-reduce = f32[]{:T(128)} all-reduce(%x), channel_id=1
      %all-reduce.11 = (f32[10]{0:T(128)}, bf16[64,10]{0,1}, /*index=2*/f32[2,4]{1,0}) all-reduce(%a, %b, %c), to_apply=%r
      %ag = f32[8,128]{1,0} all-gather-start(%y), dimensions={0}
      %agd = f32[8,128]{1,0} all-gather-done(%ag)
      %fusion = f32[4]{0} fusion(%all-reduce), kind=kLoop
      ROOT %cp = s32[3]{0} collective-permute(%z), source_target_pairs={{0,1}}
      """)
  assert steps.collectives(hlo) == {
      "all-reduce": (2, 4 + 40 + 64 * 10 * 2 + 8 * 4),
      "all-gather": (1, 8 * 128 * 4),
      "collective-permute": (1, 12)
  }


def test_missing_compiler_is_one_line(monkeypatch):
  monkeypatch.setattr(devices, "_installed", lambda module: False)
  with pytest.raises(UserError) as error:
    devices.require_compiler("gpu")
  message = str(error.value)
  assert "\n" not in message
  assert 'pip install "smope-jax[preflight-gpu]"' in message
  assert "jax_cuda12_plugin" in message


class _FakeSearch:
  """The search's view of memory: an affine function of the batch."""

  def __init__(self, fixed, per_image, capacity):
    self.fixed, self.per_image, self.capacity = fixed, per_image, capacity
    self.probes, self.names = [], []

  def probe(self, field, per_device, names):
    del field
    self.probes.append(per_device)
    self.names.append(names)
    total = self.fixed + self.per_image * per_device
    return total if total <= self.capacity else None


@pytest.mark.parametrize(
    "fixed, per_image, capacity, configured, expected",
    [
        (3_000, 700, 16_000, 8192, 18),  # (16000 - 3000) // 700
        (100, 1, 10_000, 65536, 9900),
        (20_000, 10, 16_000, 64, 0),  # Not even one image fits.
        (0, 1000, 10_000, 11, 10),
        # The compiler refuses below the nominal capacity: the line overshoots
        # once, then the bracket is halved.
        (100, 1, 10_000, 65536, 8900),
    ])
def test_largest_batch_search(fixed, per_image, capacity, configured, expected):
  """The search ends on the bracket [fits, fits + 1] in a few compiles."""
  from smope_jax.preflight import check  # pylint: disable=g-import-not-at-top
  usable = 9_000 if expected == 8900 else capacity
  fake = _FakeSearch(fixed, per_image, usable)
  search = check.Preflight.__new__(check.Preflight)
  search.capacity = search.search_capacity = capacity
  search.probe = fake.probe
  from smope_jax.preflight import steps  # pylint: disable=g-import-not-at-top
  result = check.Result(chips.parse_target("tpu:v5e-4"),
                        {"batch_size": configured * 4}, [
                            steps.Compiled("train (train)", "batch_size"),
                            steps.Compiled("eval", "eval_batch_size")
                        ], capacity)
  assert search.largest_batch(result, "batch_size") == expected
  assert len(fake.probes) <= (6 if usable == capacity else 20), fake.probes
  if expected:
    assert expected in fake.probes and expected + 1 in fake.probes + [
        configured
    ]
    assert fake.names == [{"train (train)"}] * len(fake.probes)


def _demo_config(method="smope", **overrides):
  from configs import demo  # pylint: disable=g-import-not-at-top
  config = demo.get_config(f"method={method}")
  config.pretrained = ""
  for key, value in overrides.items():
    config[key] = value
  return config


@needs_libtpu
@pytest.mark.parametrize("method", ["smope"] + [
    pytest.param(m, marks=pytest.mark.slow)
    for m in ("l2p", "deep_l2p", "dualprompt", "codaprompt")
])
def test_demo_steps_compile_for_a_4_chip_tpu(method):
  from smope_jax.preflight import check  # pylint: disable=g-import-not-at-top
  result = check.Preflight(_demo_config(method),
                           chips.parse_target("tpu:v5e-4"), 0.9).run()
  names = [s.name for s in result.steps]
  expected = ["start"] + (["train (dense)"] if method == "smope" else [])
  expected += ["train (train)"
              ] + (["expert counting"] if method == "smope" else [])
  if method == "smope":
    expected += ["class statistics", "alignment"]
  assert names == expected + ["eval"]
  assert result.fits and not result.largest
  for step in result.steps:
    # A method's task start may do nothing (L2P's): no FLOPs there.
    assert step.error is None and step.total > 0, step
    assert step.flops > 0 or step.name == "start" and step.flops == 0, step
  train = next(s for s in result.steps if s.name == "train (train)")
  # Data parallelism: the gradients are summed over the 4 chips, the head's
  # 64 x 10 + 10 float32 parameters among them.
  count, size = train.collectives["all-reduce"]
  assert count >= 1 and size >= 4 * (64 * 10 + 10)
  assert report.verdict(result).startswith("preflight: fits tpu:v5e-4: ")
  # The tables fit an 80-column terminal and name every step once.
  lines = (report.header(result, "configs/demo.py") +
           report.memory_table(result) + report.cost_table(result))
  assert max(len(line) for line in lines) <= 80, lines
  for name in names:
    assert sum(line.startswith(f"  {name} ") for line in lines) == 2, name


@needs_libtpu
@pytest.mark.slow
def test_hideprompt_compiles_its_own_steps():
  """Both stages' steps, as its phases call them; the replays and the merge
  are costed per call."""
  from smope_jax.preflight import check  # pylint: disable=g-import-not-at-top
  result = check.Preflight(_demo_config("hideprompt"),
                           chips.parse_target("tpu:v5e-4"), 0.9).run()
  names = [s.name for s in result.steps]
  assert names == [
      "start", "train (stage 1)", "features (stage 1)", "alignment (stage 1)",
      "train (stage 2)", "merge", "class statistics", "alignment (head)", "eval"
  ]
  assert result.fits
  for step in result.steps:
    assert step.error is None and step.total > 0, step
  flops = {s.name: s.flops for s in result.steps}
  # Stage 2 trains through the prompted forward; stage 1 only reads the
  # frozen one.
  assert flops["train (stage 2)"] > 1.5 * flops["train (stage 1)"]
  lines = report.cost_table(result)
  for name in ("merge", "alignment (stage 1)", "alignment (head)"):
    assert any(l.startswith(f"  {name} ") and "*" in l for l in lines), name
  assert report.train_rate(result)[1] == "train (stage 2)"


@needs_libtpu
@pytest.mark.slow
def test_multi_host_slice_compiles_as_a_whole():
  from smope_jax.preflight import check  # pylint: disable=g-import-not-at-top
  target = chips.parse_target("tpu:v5e-16")
  assert target.hosts == 4
  result = check.Preflight(_demo_config(batch_size=64, eval_batch_size=64),
                           target, 0.9).run()
  assert result.fits, report.verdict(result)
  assert [s.error for s in result.steps] == [None] * len(result.steps)


@needs_libtpu
@pytest.mark.slow
def test_does_not_fit_and_the_largest_batch_is_found_by_compiling():
  from smope_jax.preflight import check  # pylint: disable=g-import-not-at-top
  config = _demo_config(image_size=224, batch_size=4 * 65536,
                        classifier_alignment=False)
  config.model.patch_size = 16
  preflight = check.Preflight(config, chips.parse_target("tpu:v5e-4"), 0.9)
  result = preflight.run()
  assert not result.fits and not result.failed
  largest = result.largest["batch_size"]
  assert 0 < largest < 65536
  names = {s.name for s in result.steps if s.batch_field == "batch_size"}
  assert preflight.probe("batch_size", largest, names) is not None
  assert preflight.probe("batch_size", largest + 1, names) is None
  line = report.verdict(result)
  assert line.startswith("preflight: does not fit tpu:v5e-4: ")
  assert (f"largest per-device batch that fits: {largest} "
          f"(--config.batch_size={largest * 4})") in line


def _env(**extra):
  """This interpreter's environment, with the repository importable."""
  path = os.pathsep.join(
      filter(None, [helpers.REPO, os.environ.get("PYTHONPATH")]))
  return dict(os.environ, PYTHONPATH=path, **extra)


# Runs a module as `python -m` would, with some top-level packages made
# unimportable: a machine with a JAX stack only.
_WITHOUT = textwrap.dedent("""\
    import runpy, sys
    blocked = set(sys.argv[1].split(","))
    class Block:
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
          raise ModuleNotFoundError(f"No module named {name!r} (blocked)")
    sys.meta_path.insert(0, Block())
    module = sys.argv[2]
    sys.argv = [module] + sys.argv[3:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    """)


def _run_without(blocked, module, *args, timeout=600):
  return subprocess.run(
      [sys.executable, "-c", _WITHOUT, ",".join(blocked), module, *args],
      cwd=helpers.REPO, env=_env(), capture_output=True, text=True,
      timeout=timeout, check=False)


def test_missing_tpu_extra_on_the_command_line():
  result = _run_without(["libtpu"], "smope_jax.preflight",
                        "--config=configs/demo.py", "--target=tpu:v5e-4")
  assert helpers.assert_one_line_error(result) == (
      "error: compiling for TPUs needs libtpu: pip install "
      "\"smope-jax[preflight-tpu]\" (from a checkout: pip install "
      "\".[preflight-tpu]\").")


@needs_libtpu
@pytest.mark.slow
def test_preflight_and_benchmark_run_without_tensorflow_tfds_or_clu(tmp_path):
  blocked = ["tensorflow", "tensorflow_datasets", "clu"]
  out = tmp_path / "preflight.json"
  result = _run_without(blocked, "smope_jax.preflight",
                        "--config=configs/demo.py", "--target=tpu:v5e-4",
                        f"--json={out}")
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1].startswith(
      "preflight: fits tpu:v5e-4: ")
  assert out.exists()
  result = _run_without(blocked, "smope_jax.benchmark",
                        "--config=configs/demo.py", "--methods=smope",
                        "--repeats=1", "--warmup=0", "--matmul_size=64")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "smope_train" in result.stdout


def test_gpu_steps_recompile_without_triton_gemm_when_xla_cannot_tile():
  """The trainer's steps retry once, with Triton GEMMs off, on that error."""
  import jax  # pylint: disable=g-import-not-at-top
  from smope_jax import train_step  # pylint: disable=g-import-not-at-top
  compiled_with = []

  def jit_with(options):
    compiled_with.append(options)

    def step(x):
      if options is None:
        raise jax.errors.JaxRuntimeError(
            "INTERNAL: Couldn't find output tile sizes that satisfy hlo: "
            "%dot.404 = f32[25216,768]{1,0} dot(...)")
      return x + 1

    return step

  step = train_step.CompileFallback(jit_with)
  assert step(1) == 2 and step(2) == 3
  assert compiled_with == [None, {"xla_gpu_enable_triton_gemm": False}]

  def other_error(options):
    del options

    def step(x):
      raise jax.errors.JaxRuntimeError(f"RESOURCE_EXHAUSTED: {x}")

    return step

  with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
    train_step.CompileFallback(other_error)(1)
