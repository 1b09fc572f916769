"""Tests for smope_jax.models.prompt_attention: SMoPE's scoring and selection."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from smope_jax.models import attention
from smope_jax.models import prompt_attention as pa

# The head shapes of the tiny model in test_model.py (shared compiled ops).
B, N, H, D, E, K = 4, 5, 2, 8, 6, 3


def _inputs(seed: int = 0, dtype=jnp.float32):
  """Random q, k, v (B, N, H, D) and expert keys/values (H, E, D)."""
  rng = np.random.default_rng(seed)
  q, k, v = (
      jnp.asarray(rng.normal(size=(B, N, H, D)), dtype) for _ in range(3))
  expert_keys = jnp.asarray(rng.uniform(size=(H, E, D)), jnp.float32)
  expert_values = jnp.asarray(rng.uniform(size=(H, E, D)), jnp.float32)
  return q, k, v, expert_keys, expert_values


def _state(counts=None, frequent=None, layers: int = 1, heads: int = H,
           experts: int = E):
  shape = (layers, heads, experts)
  if counts is None:
    counts = np.ones(shape, np.int32)
  if frequent is None:
    frequent = np.zeros(shape, bool)
  return {
      'counts': jnp.asarray(counts, jnp.int32).reshape(shape),
      'frequent': jnp.asarray(frequent, bool).reshape(shape)
  }


def _softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def _attend(q, k, v, logits, values, fused=False):
  """SMoPE's rank-one prefix through the shared kernel."""
  return attention.prefix_attention(
      q, k, v, attention.Prefix(values=values, bias=logits), fused=fused)


def _numpy_prompted_attention(q, k, v, expert_keys, expert_values, eta, top_k):
  """The routing and attention rules written out with loops, in float64.

  Returns the output (B, N, H, D) and the selected indices (B, H, K).
  """
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  pk = np.asarray(expert_keys, np.float64)
  pv = np.asarray(expert_values, np.float64)
  eta = np.asarray(eta, np.float64)
  scale = q.shape[-1]**-0.5
  out = np.zeros_like(q)
  selected = np.zeros((q.shape[0], q.shape[2], top_k), np.int64)
  for b in range(q.shape[0]):
    for h in range(q.shape[2]):
      q_bar = q[b, :, h].mean(0)  # All N tokens, before scaling.
      s = pk[h] @ q_bar  # (E,)
      s_hat = s - eta[h] * (s.max() - s.min())
      idx = np.argsort(-s_hat, kind='stable')[:top_k]
      selected[b, h] = idx
      for i in range(q.shape[1]):
        logits = np.concatenate(
            [s[idx] * scale, k[b, :, h] @ q[b, i, h] * scale])
        w = _softmax(logits)
        out[b, i, h] = w @ np.concatenate([pv[h, idx], v[b, :, h]], 0)
  return out, selected


def test_intermediate_shapes_and_dtypes():
  q, k, v, pk, pv = _inputs()
  scores = pa.expert_scores(q, pk)
  chex.assert_shape(scores, (B, H, E))
  chex.assert_type(scores, jnp.float32)

  state = _state(frequent=np.arange(H * E).reshape(1, H, E) % 2 == 0)
  for mode in ("plain", "dense", "train", "eval"):
    eta_all = pa.selection_penalty(state, mode, 0.4, 2.0)
    chex.assert_shape(eta_all, (1, H, E))
    chex.assert_type(eta_all, jnp.float32)
  eta = pa.selection_penalty(state, 'train', 0.4, 2.0)[0]

  spread = pa.score_spread(scores)
  chex.assert_shape(spread, (B, H, 1))
  chex.assert_type(spread, jnp.float32)

  selected = pa.select_experts(scores, eta, K)
  chex.assert_shape(selected, (B, H, K))
  chex.assert_type(selected, jnp.int32)
  assert np.all((np.asarray(selected) >= 0) & (np.asarray(selected) < E))

  gathered = pa.gather_expert_vectors(pv, selected)
  chex.assert_shape(gathered, (B, H, K, D))
  chex.assert_type(gathered, jnp.float32)
  for b in range(B):
    for h in range(H):
      np.testing.assert_array_equal(gathered[b, h], pv[h, selected[b, h]])

  logits, values, scores2, selected2 = pa.route(q, pk, pv, eta, K, 'train')
  chex.assert_shape(logits, (B, H, K))
  chex.assert_type(logits, jnp.float32)
  chex.assert_shape(values, (B, H, K, D))
  chex.assert_type(values, jnp.float32)
  chex.assert_trees_all_equal(scores2, scores)
  chex.assert_trees_all_equal(selected2, selected)

  d_logits, d_values, d_scores, d_selected = pa.route(q, pk, pv, None, K,
                                                      'dense')
  chex.assert_shape(d_logits, (B, H, E))
  chex.assert_type(d_logits, jnp.float32)
  chex.assert_shape(d_values, (B, H, E, D))
  chex.assert_shape(d_scores, (B, H, E))
  chex.assert_shape(d_selected, (B, H, K))
  chex.assert_type(d_selected, jnp.int32)

  for fused in (False, True):
    out = _attend(q, k, v, logits, values, fused=fused)
    chex.assert_shape(out, (B, N, H, D))
    chex.assert_type(out, jnp.float32)
    out = attention.prefix_attention(q, k, v, None, fused=fused)
    chex.assert_shape(out, (B, N, H, D))
    chex.assert_type(out, jnp.float32)


def test_q_bar_is_mean_of_all_tokens_before_scaling():
  q, _, _, pk, _ = _inputs(1)
  scores = pa.expert_scores(q, pk)
  chex.assert_shape(scores, (B, H, E))
  q_np, pk_np = np.asarray(q, np.float64), np.asarray(pk, np.float64)
  expected = np.einsum('bhd,hed->bhe', q_np.mean(1), pk_np)
  np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
  # Not the CLS query, not the mean of the patch tokens, not scaled.
  for wrong in (np.einsum('bhd,hed->bhe', q_np[:, 0], pk_np),
                np.einsum('bhd,hed->bhe', q_np[:, 1:].mean(1),
                          pk_np), expected * D**-0.5):
    assert not np.allclose(scores, wrong, atol=1e-3)


def _ranked_scores(offset: float = 0.0, factor: float = 1.0):
  """One sample, one head: s = [5, 4, 3, 2, 1, 0] * factor + offset."""
  s = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0]) * factor + offset
  return jnp.asarray(s, jnp.float32).reshape(1, 1, E)


@pytest.mark.parametrize('offset,factor', [(0.0, 1.0), (100.0, 1.0),
                                           (-3.0, 10.0), (0.0, 0.1)])
def test_training_noise_is_epsilon_times_score_range(offset, factor):
  # Expert 1 is marked. With s = [5, 4, 3, 2, 1, 0] (range 5) it leaves the
  # top-3 exactly when 4 - 5 * epsilon < 2, i.e. epsilon > 0.4, whatever the
  # offset and scale of the scores (the penalty is relative to the range).
  scores = _ranked_scores(offset, factor)
  marks = np.zeros((1, 1, E), bool)
  marks[0, 0, 1] = True
  state = _state(frequent=marks, heads=1)

  eta = pa.selection_penalty(state, 'train', 0.41, 2.0)
  chex.assert_shape(eta, (1, 1, E))
  np.testing.assert_allclose(eta[0, 0], [0, 0.41, 0, 0, 0, 0], rtol=1e-6)
  selected = pa.select_experts(scores, eta[0], 3)
  chex.assert_shape(selected, (1, 1, 3))
  chex.assert_type(selected, jnp.int32)
  assert set(np.asarray(selected).ravel()) == {0, 2, 3}

  eta = pa.selection_penalty(state, 'train', 0.39, 2.0)
  selected = pa.select_experts(scores, eta[0], 3)
  assert set(np.asarray(selected).ravel()) == {0, 1, 2}

  # Marking the best expert with a small epsilon leaves it on top; the
  # unmarked ones keep their clean order.
  marks = np.zeros((1, 1, E), bool)
  marks[0, 0, 0] = True
  eta = pa.selection_penalty(_state(frequent=marks, heads=1), 'train', 0.19,
                             2.0)
  selected = pa.select_experts(scores, eta[0], 3)
  np.testing.assert_array_equal(selected[0, 0], [0, 1, 2])
  eta = pa.selection_penalty(_state(frequent=marks, heads=1), 'train', 0.21,
                             2.0)
  selected = pa.select_experts(scores, eta[0], 3)
  np.testing.assert_array_equal(selected[0, 0], [1, 0, 2])


def test_training_noise_ignores_counts_and_eval_ignores_marks():
  scores = _ranked_scores()
  counts = np.ones((1, 1, E), np.int32)
  counts[0, 0, 0] = 0
  marks = np.zeros((1, 1, E), bool)
  marks[0, 0, 1] = True
  state = _state(counts=counts, frequent=marks, heads=1)
  train_eta = pa.selection_penalty(state, 'train', 0.5, 2.0)
  np.testing.assert_array_equal(train_eta[0, 0], [0, 0.5, 0, 0, 0, 0])
  eval_eta = pa.selection_penalty(state, 'eval', 0.5, 2.0)
  np.testing.assert_array_equal(eval_eta[0, 0], [2.0, 0, 0, 0, 0, 0])
  dense_eta = pa.selection_penalty(state, 'dense', 0.5, 2.0)
  np.testing.assert_array_equal(dense_eta, np.zeros((1, 1, E)))
  assert set(np.asarray(pa.select_experts(scores, train_eta[0],
                                          3)).ravel()) == {0, 2, 3}
  assert set(np.asarray(pa.select_experts(scores, eval_eta[0],
                                          3)).ravel()) == {1, 2, 3}


def test_inference_never_selects_unused_experts():
  # Hand-made: the two best experts were never used.
  scores = _ranked_scores()
  counts = np.array([0, 0, 7, 1, 3, 2], np.int32)
  eta = pa.selection_penalty(_state(counts=counts, heads=1), 'eval', 0.4, 2.0)
  selected = pa.select_experts(scores, eta[0], 3)
  np.testing.assert_array_equal(selected[0, 0], [2, 3, 4])

  # Random: every sample's unused experts are skipped, and the used ones
  # are picked in their clean order.
  rng = np.random.default_rng(3)
  scores = jnp.asarray(rng.normal(size=(64, H, E)), jnp.float32)
  counts = rng.integers(0, 3, size=(1, H, E)).astype(np.int32)
  counts[0, :, :K] = np.maximum(counts[0, :, :K], 1)  # >= K used experts.
  eta = pa.selection_penalty(_state(counts=counts), 'eval', 0.4, 2.0)
  selected = np.asarray(pa.select_experts(scores, eta[0], K))
  chex.assert_shape(selected, (64, H, K))
  for h in range(H):
    used = np.flatnonzero(counts[0, h] > 0)
    assert np.all(np.isin(selected[:, h], used))
    for b in range(64):
      s = np.asarray(scores[b, h])
      expected = used[np.argsort(-s[used])][:K]
      np.testing.assert_array_equal(selected[b, h], expected)
  # Somewhere an unused expert had the best clean score.
  best = np.asarray(jnp.argmax(scores, -1))
  assert np.any(counts[0][np.arange(H)[None], best] == 0)


def test_max_and_min_carry_no_gradient():
  rng = np.random.default_rng(4)
  scores = jnp.asarray(rng.normal(size=(B, H, E)), jnp.float32)
  eta = jnp.asarray(rng.uniform(size=(H, E)), jnp.float32)

  grad = jax.grad(lambda s: pa.score_spread(s).sum())(scores)
  chex.assert_shape(grad, (B, H, E))
  np.testing.assert_array_equal(grad, np.zeros((B, H, E)))
  grad = jax.grad(lambda s: jnp.sum(s - eta[None] * pa.score_spread(s)))(scores)
  np.testing.assert_array_equal(grad, np.ones((B, H, E)))

  # Through the selection: only the selected clean scores get gradient.
  def picked(s):
    idx = pa.select_experts(s, eta, K)
    return jnp.take_along_axis(s, idx, axis=-1).sum()

  grad = jax.grad(picked)(scores)
  chex.assert_shape(grad, (B, H, E))
  chex.assert_type(grad, jnp.float32)
  selected = pa.select_experts(scores, eta, K)
  onehot = jax.nn.one_hot(selected, E).sum(-2)
  np.testing.assert_array_equal(grad, onehot)

  # And through route: prompt logits = clean scores * scale, nothing else.
  q, _, _, pk, pv = _inputs(4)

  def route_logits(keys):
    logits, _, _, _ = pa.route(q, keys, pv, eta, K, 'train')
    return logits.sum()

  grad = jax.grad(route_logits)(pk)
  chex.assert_shape(grad, (H, E, D))
  assert np.all(np.isfinite(grad))
  _, _, _, selected = pa.route(q, pk, pv, eta, K, 'train')
  expected = np.zeros((H, E, D))
  q_bar = np.asarray(q).mean(1)
  for b in range(B):
    for h in range(H):
      for j in np.asarray(selected[b, h]):
        expected[h, j] += q_bar[b, h] * D**-0.5
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('fused', [False, True])
def test_prompted_attention_matches_numpy(fused):
  q, k, v, pk, pv = _inputs(5)
  # Mark the best expert of every head with a small epsilon: it stays
  # selected but its s_hat differs from its clean score.
  clean = np.asarray(pa.expert_scores(q, pk))
  marks = np.zeros((1, H, E), bool)
  marks[0, np.arange(H), clean[0].argmax(-1)] = True
  eta = pa.selection_penalty(_state(frequent=marks), 'train', 0.05, 2.0)[0]
  logits, values, scores, selected = pa.route(q, pk, pv, eta, K, 'train')
  out = _attend(q, k, v, logits, values, fused=fused)
  chex.assert_shape(out, (B, N, H, D))
  chex.assert_type(out, jnp.float32)

  expected, expected_sel = _numpy_prompted_attention(q, k, v, pk, pv, eta, K)
  np.testing.assert_array_equal(selected, expected_sel)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  # Prompt logits are the CLEAN scores times d ** -0.5.
  np.testing.assert_allclose(
      logits,
      np.take_along_axis(clean, np.asarray(selected), -1) * D**-0.5, rtol=1e-6,
      atol=1e-6)
  s_hat = clean - np.asarray(eta)[None] * (clean.max(-1, keepdims=True) -
                                           clean.min(-1, keepdims=True))
  hat_logits = np.take_along_axis(s_hat, np.asarray(selected), -1) * D**-0.5
  assert not np.allclose(logits, hat_logits, atol=1e-4)


def test_prompt_logits_identical_for_every_query_row():
  """Reads the prompt columns of the attention matrix through one-hot values.

  With zero token values and the k-th active expert's value e_k,
  output[b, i, h, k] is the weight of prompt column k in query row i: their
  ratios must be exp((s_{I_k} - s_{I_0}) * scale) in every row.
  """
  q, k, _, pk, pv = _inputs(6)
  v = jnp.zeros_like(q)
  eta = jnp.zeros((H, E))
  logits, _, scores, selected = pa.route(q, pk, pv, eta, K, 'train')
  values = jnp.broadcast_to(jnp.eye(K, D), (B, H, K, D))  # D >= K.
  for fused in (False, True):
    weights = np.asarray(_attend(q, k, v, logits, values, fused=fused),
                         np.float64)
    chex.assert_shape(weights, (B, N, H, D))
    chosen = np.take_along_axis(np.asarray(scores), np.asarray(selected), -1)
    for b in range(B):
      for h in range(H):
        w = weights[b, :, h, :K]  # (N, K)
        assert np.all(w > 0)
        ratios = w / w[:, :1]
        expected = np.exp((chosen[b, h] - chosen[b, h, 0]) * D**-0.5)
        np.testing.assert_allclose(ratios, np.broadcast_to(expected, (N, K)),
                                   rtol=1e-5)
        # Token columns vary per row, so the total prompt weight does too.
        assert np.ptp(w.sum(-1)) > 1e-4


def test_dense_equals_topk_with_all_experts_and_no_noise():
  q, k, v, pk, pv = _inputs(7)
  d_logits, d_values, d_scores, _ = pa.route(q, pk, pv, None, K, 'dense')
  chex.assert_shape(d_logits, (B, H, E))
  np.testing.assert_allclose(d_logits, d_scores * D**-0.5, rtol=1e-6)
  np.testing.assert_array_equal(
      d_values, np.broadcast_to(np.asarray(pv)[None], (B, H, E, D)))
  t_logits, t_values, t_scores, t_selected = pa.route(q, pk, pv,
                                                      jnp.zeros((H, E)), E,
                                                      'train')
  chex.assert_shape(t_selected, (B, H, E))
  chex.assert_trees_all_equal(d_scores, t_scores)
  for fused in (False, True):
    dense = _attend(q, k, v, d_logits, d_values, fused=fused)
    topk = _attend(q, k, v, t_logits, t_values, fused=fused)
    np.testing.assert_allclose(dense, topk, rtol=1e-5, atol=1e-6)
  # Noise would not matter in dense mode anyway: a marked expert still
  # takes part. Dense is the numpy reference with K = E and no penalty.
  expected, _ = _numpy_prompted_attention(q, k, v, pk, pv, np.zeros((H, E)), E)
  dense = _attend(q, k, v, d_logits, d_values)
  np.testing.assert_allclose(dense, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('mode', ['train', 'eval', 'dense'])
def test_fused_equals_einsum(mode):
  q, k, v, pk, pv = _inputs(8)
  rng = np.random.default_rng(8)
  state = _state(counts=rng.integers(0, 3, (1, H, E)),
                 frequent=rng.uniform(size=(1, H, E)) < 0.3)
  eta = pa.selection_penalty(state, mode, 0.5, 2.0)[0]
  logits, values, _, _ = pa.route(q, pk, pv, eta, K, mode)
  einsum = _attend(q, k, v, logits, values, fused=False)
  fused = _attend(q, k, v, logits, values, fused=True)
  chex.assert_equal_shape([einsum, fused])
  chex.assert_type(fused, jnp.float32)
  np.testing.assert_allclose(fused, einsum, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(
      attention.prefix_attention(q, k, v, None, fused=True),
      attention.prefix_attention(q, k, v, None, fused=False), atol=1e-5,
      rtol=1e-5)


def test_very_negative_prompt_logits_give_plain_attention():
  q, k, v, _, pv = _inputs(9)
  logits = jnp.full((B, H, K), -1e9, jnp.float32)
  values = jnp.broadcast_to(pv[None, :, :K], (B, H, K, D))
  for fused in (False, True):
    out = _attend(q, k, v, logits, values, fused=fused)
    np.testing.assert_allclose(out, attention.prefix_attention(q, k, v),
                               atol=1e-5, rtol=1e-5)


def test_bfloat16_keeps_scores_float32():
  q, k, v, pk, pv = _inputs(10, jnp.bfloat16)
  chex.assert_type(q, jnp.bfloat16)
  scores = pa.expert_scores(q, pk)
  chex.assert_shape(scores, (B, H, E))
  chex.assert_type(scores, jnp.float32)
  state = _state(frequent=np.ones((1, H, E), bool))
  eta = pa.selection_penalty(state, 'train', 0.4, 2.0)[0]
  for mode in ('train', 'dense'):
    logits, values, scores, selected = pa.route(q, pk, pv, eta, K, mode)
    chex.assert_type(logits, jnp.float32)
    chex.assert_type(scores, jnp.float32)
    chex.assert_type(selected, jnp.int32)
    for fused in (False, True):
      out = _attend(q, k, v, logits, values, fused=fused)
      chex.assert_shape(out, (B, N, H, D))
      chex.assert_type(out, jnp.bfloat16)
      ref = _attend(q.astype(jnp.float32), k.astype(jnp.float32),
                    v.astype(jnp.float32), logits, values)
      np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=5e-2)
