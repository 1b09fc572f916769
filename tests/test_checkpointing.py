"""Tests for smope_jax.checkpointing: round trips and recovery from damage."""

import logging
import pathlib
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from smope_jax import checkpointing
from smope_jax import errors

# After a failed read, TensorStore callbacks can reach Orbax's already closed
# event loop; Python reports that as an unraisable exception. It is harmless.
pytestmark = pytest.mark.filterwarnings(
    'ignore::pytest.PytestUnraisableExceptionWarning')


def _state(value: float = 1.0):
  params = {
      'prompt': {
          'keys': jnp.full((2, 3, 4), value),
          'values': jnp.zeros(5)
      },
      'head': {
          'w': jnp.full((4, 2), value, jnp.bfloat16)
      },
  }
  opt_state = optax.adam(1e-3).init(params)
  return {
      'params': params,
      'opt_state': opt_state,
      'counts': np.arange(6, dtype=np.int32).reshape(2, 3) * int(value),
      'marks': np.array([[True, False, value > 1]]),
      'rng': jax.random.key_data(jax.random.key(int(value))),
      'step': np.int64(7 * value),
      'epoch': int(value),
  }


def _meta(step: int):
  return {'task': step, 'phase': 'topk', 'acc': [[90.5, None], [80.0, 70.25]]}


def _assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    assert type(a) is type(e), (type(a), type(e))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))
    assert np.asarray(a).dtype == np.asarray(e).dtype


def _save_steps(directory, steps, **kwargs):
  ckpt = checkpointing.Checkpointer(directory, **kwargs)
  for step in steps:
    assert ckpt.save(step, _state(float(step)), _meta(step))
  ckpt.wait_until_finished()
  ckpt.close()


def _restore(directory):
  ckpt = checkpointing.Checkpointer(directory)
  try:
    return ckpt.restore_latest(_state(0.0))
  finally:
    ckpt.close()


def test_round_trip_into_concrete_template(tmp_path):
  _save_steps(tmp_path, [5])
  step, state, meta = _restore(tmp_path)
  assert step == 5
  _assert_trees_equal(state, _state(5.0))
  assert isinstance(state['opt_state'][0], optax.ScaleByAdamState)
  assert meta == _meta(5)


def test_round_trip_into_abstract_template(tmp_path):
  _save_steps(tmp_path, [3])
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      _state(0.0)['params'])
  ckpt = checkpointing.Checkpointer(tmp_path)
  template = dict(_state(0.0), params=abstract)
  step, state, _ = ckpt.restore_latest(template)
  ckpt.close()
  assert step == 3
  _assert_trees_equal(state['params'], _state(3.0)['params'])
  assert all(
      isinstance(x, jax.Array) and x.sharding == sharding
      for x in jax.tree.leaves(state['params']))


def test_empty_directory_gives_none(tmp_path):
  assert _restore(tmp_path / 'checkpoints') is None


def test_max_to_keep_and_steps(tmp_path):
  _save_steps(tmp_path, [1, 2, 3, 4], max_to_keep=2)
  ckpt = checkpointing.Checkpointer(tmp_path, max_to_keep=2)
  assert ckpt.all_steps() == [3, 4]
  assert ckpt.latest_step() == 4
  assert not ckpt.save(4, _state(), _meta(4))  # not newer: skipped
  ckpt.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['3', '4']


def test_meta_that_is_not_json_fails_at_save(tmp_path):
  ckpt = checkpointing.Checkpointer(tmp_path)
  with pytest.raises(TypeError):
    ckpt.save(1, _state(), {'acc': np.float32(1.0)})
  ckpt.close()


def test_meta_is_snapshotted_at_save(tmp_path):
  ckpt = checkpointing.Checkpointer(tmp_path)
  meta = _meta(1)
  ckpt.save(1, _state(), meta)
  meta['acc'].append([1.0])
  ckpt.wait_until_finished()
  assert ckpt.restore_latest(_state())[2] == _meta(1)
  ckpt.close()


def _delete_array_data(step_dir: pathlib.Path):
  data = [p for p in (step_dir / 'state').rglob('*') if p.parent.name == 'd']
  assert data
  for path in data:
    path.unlink()


def _truncate_array_data(step_dir: pathlib.Path):
  data = [p for p in (step_dir / 'state').rglob('*') if p.parent.name == 'd']
  assert data
  for path in data:
    with path.open('r+b') as f:
      f.truncate(7)


def _truncate_tree_metadata(step_dir: pathlib.Path):
  with (step_dir / 'state' / '_METADATA').open('r+b') as f:
    f.truncate(20)


def _delete_meta_json(step_dir: pathlib.Path):
  (step_dir / 'meta' / 'metadata').unlink()


@pytest.mark.parametrize('damage', [
    _delete_array_data, _truncate_array_data, _truncate_tree_metadata,
    _delete_meta_json
])
def test_falls_back_to_previous_readable_step(tmp_path, caplog, damage):
  _save_steps(tmp_path, [1, 2])
  damage(tmp_path / '2')
  ckpt = checkpointing.Checkpointer(tmp_path)
  with caplog.at_level(logging.WARNING):
    step, state, meta = ckpt.restore_latest(_state(0.0))
  assert step == 1
  _assert_trees_equal(state, _state(1.0))
  assert meta == _meta(1)
  assert any('step 2' in r.getMessage() and r.levelno == logging.WARNING
             for r in caplog.records)
  # The bad step is kept, under a name that frees step 2 for the new run.
  assert (tmp_path / 'corrupt-2').is_dir()
  assert ckpt.all_steps() == [1]
  assert ckpt.save(2, _state(2.0), _meta(2))
  ckpt.wait_until_finished()
  assert ckpt.restore_latest(_state(0.0))[0] == 2
  ckpt.close()


def test_unfinished_save_is_ignored_with_a_warning(tmp_path, caplog):
  _save_steps(tmp_path, [1])
  unfinished = tmp_path / '2.orbax-checkpoint-tmp-1700000000'
  (unfinished / 'state').mkdir(parents=True)
  (unfinished / 'state' / '_METADATA').write_text('{"tree_meta')
  with caplog.at_level(logging.WARNING):
    assert _restore(tmp_path)[0] == 1
  assert any(unfinished.name in r.getMessage() for r in caplog.records)
  assert unfinished.is_dir()


def test_all_steps_unreadable_raises_user_error(tmp_path):
  _save_steps(tmp_path, [1, 2])
  for step in ('1', '2'):
    _delete_array_data(tmp_path / step)
  with pytest.raises(errors.UserError, match='--workdir') as info:
    _restore(tmp_path)
  assert str(tmp_path) in str(info.value)
  # Nothing is moved or deleted when there is nothing to resume from.
  assert sorted(p.name for p in tmp_path.iterdir()) == ['1', '2']


def test_other_state_layout_raises_user_error(tmp_path):
  _save_steps(tmp_path, [1])
  template = _state(0.0)
  template['counts'] = np.zeros((4, 3), np.int32)
  template['extra'] = np.zeros(2)
  ckpt = checkpointing.Checkpointer(tmp_path)
  with pytest.raises(errors.UserError, match='counts.*extra|extra.*counts'):
    ckpt.restore_latest(template)
  ckpt.close()
  assert (tmp_path / '1').is_dir()


def _assert_quiet_full_disk_error(error, capfd, caplog, directory):
  """One user error, nothing else reported, no unfinished save left."""
  assert 'no space left' in str(error.value)
  assert 're-run the same command to resume' in str(error.value)
  printed = capfd.readouterr()
  assert 'Traceback' not in printed.err + printed.out
  assert 'Event loop is closed' not in printed.err + printed.out
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
  assert not [
      p for p in directory.iterdir() if 'orbax-checkpoint-tmp' in p.name
  ]


def test_full_disk_in_the_writer_is_one_error_and_leaves_nothing(
    tmp_path, capfd, caplog, monkeypatch, full_disk_at_save):
  _save_steps(tmp_path, [1, 2])
  ckpt = checkpointing.Checkpointer(tmp_path)
  full_disk_at_save(1)
  capfd.readouterr()
  with caplog.at_level(logging.INFO), pytest.raises(
      errors.UserError, match=str(tmp_path)) as error:
    ckpt.save(3, _state(3.0), _meta(3))
  _assert_quiet_full_disk_error(error, capfd, caplog, tmp_path)
  monkeypatch.undo()  # Space again: step 3 is saved anew.
  assert ckpt.restore_latest(_state(0.0))[0] == 2
  assert ckpt.save(3, _state(3.0), _meta(3))
  step, state, _ = ckpt.restore_latest(_state(0.0))
  ckpt.close()
  assert step == 3
  _assert_trees_equal(state, _state(3.0))


def test_full_tmpfs_is_one_error_and_gives_the_space_back(
    tmp_path, capfd, caplog, tmpfs):
  """A real full disk: TensorStore's writers fail in several threads."""
  rng = np.random.default_rng(0)
  # 12 incompressible arrays of 8 kB: about 100 kB per checkpoint.
  state = {f'a{i}': rng.random(2000, np.float32) for i in range(12)}
  with tmpfs(tmp_path / 'mnt', 'size=300k') as mnt:
    ckpt = checkpointing.Checkpointer(mnt / 'checkpoints')
    capfd.readouterr()
    with caplog.at_level(logging.INFO), pytest.raises(
        errors.UserError) as error:
      for step in range(1, 6):
        ckpt.save(step, state, {'task': step})
    _assert_quiet_full_disk_error(error, capfd, caplog, mnt / 'checkpoints')
    assert ckpt.restore_latest(state)[0] == step - 1
    ckpt.close()


_PHASES = ('start', 'train', 'eval')
# A task loop's metadata after task 1 of 2, as `Run` writes it.
_RUN_META = {
    'config': {
        'lr': 0.1
    },
    'task': 1,
    'phase': 'train',
    'epoch': 0,
    'step': 3,
    'global_step': 9,
    'save_id': 4,
    'seed': 0,
    'acc_matrix': [[80.0]],
    'task_seconds': [2.5],
    'train_log': [],
    'train_images_per_second': [100.0]
}


def _check(meta):
  checkpointing.check_run_meta(meta, 'wd', {'lr': 0.1}, 2, _PHASES)


def test_a_run_meta_at_a_possible_position_passes():
  _check(_RUN_META)
  _check(dict(_RUN_META, task=2, acc_matrix=[[80.0], [70.0, 60.0]]))


@pytest.mark.parametrize('change, problem', [({
    'task': 3,
    'acc_matrix': [[1.0], [1.0, 1.0], [1.0, 1.0, 1.0]]
}, 'task 3'), ({
    'phase': 'topk'
}, "phase 'topk'"), ({
    'acc_matrix': [[80.0, 1.0]]
}, 'accuracy matrix'), ({
    'acc_matrix': [[101.0]]
}, 'accuracy matrix'), ({
    'step': -1
}, 'step'), ({
    'seed': True
}, 'seed'), ({
    'train_log': None
}, 'train_log')])
def test_a_run_meta_at_an_impossible_position_is_malformed(change, problem):
  with pytest.raises(checkpointing.MalformedCheckpoint,
                     match=f'malformed: {problem}'):
    _check(dict(_RUN_META, **change))


def test_a_run_meta_of_another_config_or_version_is_refused():
  with pytest.raises(errors.UserError, match='wd'):
    _check(dict(_RUN_META, config={'lr': 0.2}))
  older = {k: v for k, v in _RUN_META.items() if k != 'config'}
  with pytest.raises(errors.UserError, match='written by an older smope_jax'):
    _check(older)


def test_a_writer_thread_listed_while_it_starts_is_still_joined(monkeypatch):
  """A failed save waits for its writers; one listed before it has started
  (Python then refuses to join it) is joined once it runs."""
  finished = threading.Event()
  late = threading.Thread(target=lambda: (time.sleep(0.05), finished.set()))
  monkeypatch.setattr(threading, "enumerate", lambda: [late])
  threading.Timer(0.05, late.start).start()
  checkpointing._join_new_threads(set())  # pylint: disable=protected-access
  assert finished.is_set()
