"""GLUE models and files: the BERT encoder, pre-trained MiniLM, save/load, tokenizers, metrics."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from kdaif_jax import losses, models
from kdaif_jax.models import bert
from kdaif_jax.text import metrics, tokenize, weights

SENTENCES = [
  "A man is eating food.",
  "A man is eating a piece of bread.",
  "A monkey is playing drums.",
]


def _tiny(vocab=50, classes=3):
  model = models.create("bert_tiny", classes, vocab_size=vocab)
  x = np.zeros((1, 3, 8), np.int32)
  params, state = model.init(jax.random.key(0), x)
  return model, params, state


def _batch(rng, b, length, real, vocab=50):
  """[b, 3, length] with ``real`` tokens per row (ids > 0, types 0/1, mask)."""
  x = np.zeros((b, 3, length), np.int32)
  for i, n in enumerate(real):
    x[i, 0, :n] = rng.integers(1, vocab, n)
    x[i, 1, n // 2 : n] = 1
    x[i, 2, :n] = 1
  return x


def test_masked_tokens_change_nothing():
  model, params, state = _tiny()
  rng = np.random.default_rng(0)
  x = _batch(rng, 3, 8, [8, 5, 2])
  y = x.copy()
  pad = y[:, 2] == 0
  y[:, 0][pad] = rng.integers(1, 50, pad.sum())  # other ids and types where masked
  y[:, 1][pad] = 1
  longer = np.pad(x, ((0, 0), (0, 0), (0, 8)))  # and more padding
  hidden = jax.jit(
    lambda v: model.module.apply({"params": params}, v, method=bert.Bert.hidden_states)
  )
  logits = jax.jit(lambda v: model.apply(params, state, v, False)[0])
  h = np.asarray(hidden(x))
  for other in (y, longer):
    np.testing.assert_allclose(
      np.asarray(hidden(other))[:, :8][x[:, 2] > 0], h[x[:, 2] > 0], atol=1e-5
    )
    np.testing.assert_allclose(logits(other), logits(x), atol=1e-5)


def test_attention_matches_direct_einsum():
  rng = np.random.default_rng(1)
  q, k, v = (rng.normal(size=(2, 3, 4, 5)).astype(np.float32) for _ in range(3))
  mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
  out = np.asarray(
    bert.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask))
  )
  ref = np.zeros_like(q)
  for b in range(2):
    keys = np.flatnonzero(mask[b])
    s = np.einsum("hqd,hkd->hqk", q[b], k[b][:, keys]) / np.sqrt(5.0)
    p = np.exp(s - s.max(-1, keepdims=True))
    ref[b] = np.einsum("hqk,hkd->hqd", p / p.sum(-1, keepdims=True), v[b][:, keys])
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_self_attention_module_is_multi_head_attention():
  """The module's einops head split equals per-head attention written by hand."""
  rng = np.random.default_rng(2)
  x = rng.normal(size=(2, 4, 6)).astype(np.float32)
  mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)
  mod = bert.SelfAttention(hidden=6, heads=3)
  p = mod.init(jax.random.key(0), x, mask)["params"]
  out = np.asarray(mod.apply({"params": p}, x, mask))
  proj = {
    n: x @ np.asarray(p[n]["kernel"]) + np.asarray(p[n]["bias"]) for n in ("query", "key", "value")
  }
  heads = []
  for h in range(3):
    sl = slice(2 * h, 2 * h + 2)
    s = np.einsum("bqd,bkd->bqk", proj["query"][..., sl], proj["key"][..., sl]) / np.sqrt(2.0)
    s = np.where(mask[:, None, :], s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    heads.append(np.einsum("bqk,bkd->bqd", w / w.sum(-1, keepdims=True), proj["value"][..., sl]))
  y = (
    x
    + np.concatenate(heads, -1) @ np.asarray(p["output"]["kernel"])
    + np.asarray(p["output"]["bias"])
  )
  mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
  ref = (y - mu) / np.sqrt(var + 1e-12) * np.asarray(p["LayerNorm"]["scale"]) + np.asarray(
    p["LayerNorm"]["bias"]
  )
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_registry_sizes():
  count = lambda name: models.param_count(
    jax.eval_shape(models.create(name, 2).init, jax.random.key(0), jnp.zeros((1, 3, 8)))[0]
  )
  assert count("bert_minilm") == 22_713_986  # all-MiniLM-L6-v2 (22.7M) + a 2-class head
  assert count("bert_base") == 109_483_778  # BERT-base (110M) + a 2-class head
  assert (
    count("bert_minilm_l1")
    < count("bert_minilm_l2")
    < count("bert_minilm_l4")
    < count("bert_minilm")
  )
  assert set(models.text_names()).isdisjoint(models.names())
  assert weights.spread_layers(1, 6) == [0] and weights.spread_layers(2, 6) == [0, 5]
  assert weights.spread_layers(4, 6) == [0, 2, 3, 5]


@pytest.fixture(scope="module")
def minilm():
  return weights.minilm_dir()


def test_minilm_paraphrases_are_closer_than_unrelated(minilm):
  hidden, mask = weights.encode(minilm, SENTENCES)
  assert hidden.shape[0] == 3 and hidden.shape[2] == 384 and mask.shape == hidden.shape[:2]
  e = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  e /= np.linalg.norm(e, axis=1, keepdims=True)
  para, unrelated = float(e[0] @ e[1]), float(e[0] @ e[2])
  # sentence-transformers' all-MiniLM-L6-v2 gives 0.755 and 0.048 for these pairs.
  assert para > 0.7 and unrelated < 0.15, (para, unrelated)


def test_student_takes_a_layer_subset_of_the_teacher(minilm):
  model = models.create("bert_minilm_l2", 2)
  like, _ = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 3, 8)))
  params = weights.init_pretrained("minilm", like)
  teacher = weights.load_params(
    minilm,
    jax.eval_shape(models.create("bert_minilm", 2).init, jax.random.key(0), jnp.zeros((1, 3, 8)))[
      0
    ],
  )
  for ours, theirs in (("layers_0", "layers_0"), ("layers_1", "layers_5")):
    np.testing.assert_array_equal(
      params[ours]["intermediate"]["kernel"], teacher[theirs]["intermediate"]["kernel"]
    )
  np.testing.assert_array_equal(
    params["classifier"]["kernel"], like["classifier"]["kernel"]
  )  # head: random


def test_vocab_txt_only_directory_tokenizes_like_tokenizer_json(minilm, tmp_path):
  tok = tokenize.load_tokenizer(minilm)
  vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
  (tmp_path / "vocab.txt").write_text("\n".join(t for t, _ in vocab) + "\n")
  pairs = (SENTENCES, SENTENCES[::-1])
  np.testing.assert_array_equal(
    tokenize.pack(tokenize.load_tokenizer(tmp_path), *pairs, max_length=12),
    tokenize.pack(tok, *pairs, max_length=12),
  )
  packed = tokenize.pack(tok, *pairs, max_length=12)
  assert packed.shape == (3, 3, 12) and packed[:, 2].sum(1).max() == 12  # truncated
  with pytest.raises(tokenize.TokenizerNotFoundError, match="neither tokenizer.json nor vocab.txt"):
    tokenize.load_tokenizer(tmp_path / "nothing")


def test_save_and_load_round_trip_is_identical(tmp_path):
  tok = tokenize.train_tokenizer(SENTENCES * 5, vocab_size=120)
  assert tok.token_to_id("[PAD]") == 0
  model = models.create("bert_tiny", 3, vocab_size=tok.get_vocab_size())
  x = tokenize.pack(tok, SENTENCES, max_length=16)
  params, state = model.init(jax.random.key(3), x)
  weights.save_pretrained(str(tmp_path), params, model.module, tok)
  cfg = json.loads((tmp_path / "config.json").read_text())
  assert cfg["num_hidden_layers"] == 2 and cfg["hidden_size"] == 32 and cfg["num_labels"] == 3
  again = models.create("bert_tiny", 3, **weights.model_kwargs(str(tmp_path)))
  fresh, _ = again.init(jax.random.key(9), x)
  loaded = weights.load_params(str(tmp_path), fresh)
  np.testing.assert_array_equal(
    again.apply(loaded, state, x, False)[0], model.apply(params, state, x, False)[0]
  )
  hidden, mask = weights.encode(str(tmp_path), SENTENCES, max_length=16)
  direct = model.module.apply({"params": params}, x, method=bert.Bert.hidden_states)
  np.testing.assert_allclose(hidden, direct, atol=1e-6)
  np.testing.assert_array_equal(mask, x[:, 2] > 0)


def test_wrong_name_or_shape_is_one_line(tmp_path):
  from safetensors.numpy import load_file, save_file

  model, params, _ = _tiny()
  weights.save_pretrained(str(tmp_path), params, model.module)
  path = os.path.join(tmp_path, "model.safetensors")
  tensors = load_file(path)
  name = "encoder.layer.1.attention.self.key.weight"
  save_file({k: v for k, v in tensors.items() if k != name}, path)
  with pytest.raises(weights.WeightsError) as info:
    weights.load_params(str(tmp_path), params)
  assert (
    repr(name) in str(info.value) and "missing" in str(info.value) and "\n" not in str(info.value)
  )
  tensors[name] = tensors[name][:, :16]
  save_file(tensors, path)
  with pytest.raises(weights.WeightsError) as info:
    weights.load_params(str(tmp_path), params)
  assert (
    repr(name) in str(info.value) and "(32, 16)" in str(info.value) and "\n" not in str(info.value)
  )


def test_metrics_equal_sklearn_and_scipy():
  y = np.array([0, 1, 1, 0, 1, 1, 0, 0])
  logits = np.array([[2, 1], [0, 3], [1, 0], [4, 1], [0, 1], [1, 2], [0, 1], [3, 0]], float)
  p = logits.argmax(1)
  assert metrics.task_metrics("cola", logits, y) == {"matthews": skm.matthews_corrcoef(y, p)}
  assert metrics.task_metrics("mrpc", logits, y) == {"f1": skm.f1_score(y, p), "accuracy": 0.75}
  assert metrics.task_metrics("qqp", logits, y)["f1"] == pytest.approx(0.75)  # tp 3, fp 1, fn 1
  three = np.eye(3)[[0, 1, 2, 2]]
  assert metrics.task_metrics("mnli", three, np.array([0, 1, 2, 1])) == {"accuracy": 0.75}
  s, t = np.array([0.1, 2.0, 3.5, 4.0, 1.0]), np.array([0.0, 2.5, 3.0, 5.0, 2.0])
  out = metrics.task_metrics("stsb", s[:, None], t)
  assert out == {"pearson": stats.pearsonr(s, t)[0], "spearman": stats.spearmanr(s, t)[0]}
  assert np.isnan(metrics.task_metrics("stsb", np.ones((5, 1)), t)["pearson"])
  with pytest.raises(ValueError, match="unknown GLUE task"):
    metrics.task_metrics("squad", logits, y)


def test_regression_losses():
  s, t, y = jnp.array([[1.0], [2.0]]), jnp.array([[0.0], [2.0]]), jnp.array([3.0, 1.0])
  np.testing.assert_allclose(losses.supervised_loss(s, y), [4.0, 1.0])
  np.testing.assert_allclose(losses.KDOptions(4.0, 0.25)(s, t, y), [0.25 * 4 + 0.75 * 1, 0.25 * 1])
  ids = jnp.array([1, 0])
  logits = jnp.array([[0.0, 1.0], [2.0, 0.0]])
  np.testing.assert_array_equal(
    losses.supervised_loss(logits, ids), losses.cross_entropy(logits, ids)
  )
