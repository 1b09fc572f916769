"""Tests for smope_jax.metrics and smope_jax.plots on hand-computed cases."""

import json
import math
import warnings

import numpy as np
from PIL import Image
import pytest

from smope_jax import metrics
from smope_jax import plots

NAN = float('nan')

# Task 1 improves after the last task (86 > 80), which is exactly where the
# paper's FFM (max over earlier rows) and HiDe-Prompt's (max incl. the last
# row) differ.
ACC = [[90.0, NAN, NAN], [84.0, 80.0, NAN], [78.0, 86.0, 95.0]]


def test_three_tasks_by_hand():
  assert metrics.final_average_accuracy(ACC) == pytest.approx(259.0 / 3)
  # Averages after each task: 90, (84 + 80) / 2 = 82, 259 / 3.
  assert metrics.cumulative_average_accuracy(ACC) == pytest.approx(
      (90.0 + 82.0 + 259.0 / 3) / 3)
  # Task 0: 90 - 78 = 12; task 1: 80 - 86 = -6.
  assert metrics.final_forgetting(ACC) == pytest.approx(3.0)
  # Task 0: 90 - 78 = 12; task 1: 86 - 86 = 0.
  assert metrics.final_forgetting_hide(ACC) == pytest.approx(6.0)
  np.testing.assert_allclose(metrics.average_accuracy_per_step(ACC),
                             [90.0, 82.0, 259.0 / 3])


def test_single_task():
  acc = np.array([[73.5]])
  assert metrics.final_average_accuracy(acc) == 73.5
  assert metrics.cumulative_average_accuracy(acc) == 73.5
  assert metrics.final_forgetting(acc) == 0.0
  assert metrics.final_forgetting_hide(acc) == 0.0


def test_run_in_progress_uses_trained_tasks_only():
  acc = np.full((4, 4), np.nan)
  acc[:2, :2] = [[90.0, NAN], [84.0, 80.0]]
  assert metrics.final_average_accuracy(acc) == pytest.approx(82.0)
  assert metrics.cumulative_average_accuracy(acc) == pytest.approx(86.0)
  assert metrics.final_forgetting(acc) == pytest.approx(6.0)
  summary = metrics.summarize(acc)
  assert summary['num_tasks'] == 2
  assert len(summary['acc_matrix']) == 4
  assert summary['acc_matrix'][3] == [None] * 4


def test_values_above_the_diagonal_are_ignored():
  filled = np.nan_to_num(np.array(ACC), nan=0.0)
  assert metrics.summarize(filled)['acc_matrix'] == metrics.summarize(
      ACC)['acc_matrix']
  assert metrics.final_forgetting(filled) == pytest.approx(3.0)


@pytest.mark.parametrize(
    'acc',
    [
        [[90.0, NAN], [NAN, 80.0]],  # A[1][0] missing in a trained row
        [[1.0, 2.0, 3.0]],  # not square
        [[NAN]],  # nothing evaluated
    ])
def test_invalid_matrices_are_rejected(acc):
  with pytest.raises(ValueError):
    metrics.final_average_accuracy(acc)


def test_sample_weighted_accuracy():
  assert metrics.sample_weighted_accuracy([45, 90], [50, 100]) == 90.0
  assert metrics.sample_weighted_accuracy([10, 90],
                                          [50, 100]) == pytest.approx(200.0 / 3)
  with pytest.raises(ValueError):
    metrics.sample_weighted_accuracy([1, 2], [3])


def test_summarize_is_json_and_complete():
  summary = metrics.summarize(ACC, test_sizes=[100, 200, 300])
  assert summary['acc_matrix'] == [[90.0, None, None], [84.0, 80.0, None],
                                   [78.0, 86.0, 95.0]]
  assert summary['faa'] == pytest.approx(259.0 / 3)
  assert summary['ffm'] == pytest.approx(3.0)
  assert summary['ffm_hide'] == pytest.approx(6.0)
  # (78 * 100 + 86 * 200 + 95 * 300) / 600.
  assert summary['faa_sample_weighted'] == pytest.approx(53500.0 / 600)
  assert json.loads(json.dumps(summary, allow_nan=False)) == summary
  assert 'faa_sample_weighted' not in metrics.summarize(ACC)


def _run(faa, ffm):
  return {'faa': faa, 'caa': faa + 1.0, 'ffm': ffm, 'ffm_hide': ffm + 0.5}


def test_summarize_seeds_reports_population_and_sample_std():
  result = metrics.summarize_seeds(
      [_run(80.0, 1.0), _run(82.0, 2.0),
       _run(84.0, 3.0)])
  assert result['num_seeds'] == 3
  # Population std (ddof 0, the paper's): sqrt(8 / 3); sample std: 2.
  assert result['faa']['mean'] == 82.0
  assert result['faa']['std'] == pytest.approx(math.sqrt(8.0 / 3.0))
  assert result['faa']['sample_std'] == pytest.approx(2.0)
  assert result['faa']['values'] == [80.0, 82.0, 84.0]
  assert result['ffm']['std'] == pytest.approx(math.sqrt(2.0 / 3.0))
  assert result['ffm_hide']['mean'] == pytest.approx(2.5)
  assert 'faa_sample_weighted' not in result
  json.dumps(result, allow_nan=False)


def test_summarize_one_seed_has_zero_std():
  result = metrics.summarize_seeds([metrics.summarize(ACC)])
  assert result['faa']['std'] == result['faa']['sample_std'] == 0.0
  assert result['faa']['mean'] == pytest.approx(259.0 / 3)


def test_format_seed_table():
  table = metrics.format_seed_table(
      metrics.summarize_seeds(
          [_run(80.0, 1.0), _run(82.0, 2.0),
           _run(84.0, 3.0)]))
  lines = table.strip().split('\n')
  assert lines[0] == ('| metric | mean +- std (ddof 0, as the paper) | '
                      'sample std (ddof 1) | per-seed values |')
  assert lines[2] == '| FAA | 82.00 +- 1.63 | 2.00 | 80.00, 82.00, 84.00 |'
  assert lines[4] == '| FFM | 2.00 +- 0.82 | 1.00 | 1.00, 2.00, 3.00 |'
  assert [line.split(' | ')[0] for line in lines[2:]
         ] == ['| FAA', '| CAA', '| FFM', '| FFM (HiDe)']


def _png_size(path):
  assert len(path.read_bytes()) > 1000
  with Image.open(path) as image:
    assert image.format == 'PNG'
    return image.size


def test_plot_accuracy_matrix(tmp_path):
  path = plots.plot_accuracy_matrix(ACC, tmp_path / 'figs' / 'acc.png',
                                    title='CIFAR-100, seed 0')
  width, height = _png_size(path)
  assert 250 <= width <= 900 and 250 <= height <= 900
  big = np.tril(np.full((20, 20), 50.0)) + np.triu(np.full((20, 20), NAN), 1)
  width, height = _png_size(plots.plot_accuracy_matrix(big, tmp_path / 'b.png'))
  assert 700 <= width <= 2000 and 700 <= height <= 2000


def test_plot_expert_frequencies(tmp_path):
  counts = np.random.default_rng(0).integers(0, 50, size=(6, 12, 25))
  counts[2, 5] = 0  # a head that never routed anything
  frequent = counts > 40
  with warnings.catch_warnings():
    warnings.simplefilter('error', RuntimeWarning)
    path = plots.plot_expert_frequencies(counts, tmp_path / 'experts.png',
                                         top_k=5, frequent=frequent,
                                         title='a run')
  width, height = _png_size(path)
  assert 1000 <= width <= 3500 and 400 <= height <= 1600
  single = plots.plot_expert_frequencies(counts[:1, :2, :3],
                                         tmp_path / 'one.png', top_k=1,
                                         title='one')
  width, height = _png_size(single)
  assert 200 <= width <= 900 and 150 <= height <= 700
  with pytest.raises(ValueError):
    plots.plot_expert_frequencies(counts[0], tmp_path / 'bad.png', top_k=5)
