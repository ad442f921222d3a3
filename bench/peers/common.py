"""Shared by the peer benchmarks: the noisy digits split, the trained cnn_small, metrics.

One split and one set of weights for every method:

* data: ``kdaif_jax.data.load`` on the data section of ``configs/digits_noisy.py``
  (scikit-learn digits, a seeded 200-example clean validation slice of the training
  split, 40% symmetric label noise on the 1238 training labels; ``--noise`` changes
  the rate), normalised once with the training mean / std, as float32 NHWC arrays;
* model: ``models.create("cnn_small", 10)`` (16,698 parameters, no batch norm),
  trained on the noisy labels by plain minibatch Adam, saved once as .npz
  (``bench/results/peers_cache/``) and loaded from there by every later run.
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys
import time

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
CACHE = BENCH / "results" / "peers_cache"
if str(BENCH) not in sys.path:
  sys.path.insert(0, str(BENCH))
bench_common = importlib.import_module("_common")  # bench/_common.py: environment, JSON

NUM_CLASSES = 10
MODEL = "cnn_small"
# Training of the shared weights: minibatch Adam on the noisy labels.
TRAIN = dict(lr=3e-3, steps=400, batch=64, seed=0)


def load_split(noise: float = 0.4, seed: int = 0) -> dict[str, np.ndarray]:
  """The noisy digits split as float32 NHWC arrays (normalised) and int32 labels.

  Returns:
    dict with x, y (noisy), y_clean, noisy (bool) for the training split; xv, yv
    (clean validation); xt, yt (clean test).
  """
  from kdaif_jax import data

  spec = importlib.util.spec_from_file_location("digits_noisy", ROOT / "configs/digits_noisy.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config().data
  cfg.noise.rate = float(noise)
  cfg.seed = int(seed)
  ds = data.load(cfg)
  norm = lambda s: np.asarray(data.normalize(s.images, ds.mean, ds.std), np.float32)
  return {
    "x": norm(ds.train),
    "y": ds.train.labels.astype(np.int32),
    "y_clean": ds.train.clean_labels.astype(np.int32),
    "noisy": ds.train.noisy.astype(bool),
    "xv": norm(ds.val),
    "yv": ds.val.labels.astype(np.int32),
    "xt": norm(ds.test),
    "yt": ds.test.labels.astype(np.int32),
  }


def weights_path(noise: float, seed: int) -> pathlib.Path:
  t = TRAIN
  name = f"{MODEL}_noise{noise:g}_seed{seed}_adam{t['lr']:g}_{t['steps']}x{t['batch']}.npz"
  return CACHE / name


def flatten_params(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
  """A Flax params dict as {"Conv_0/kernel": array, ...}."""
  out = {}
  for k, v in params.items():
    if isinstance(v, dict):
      out.update(flatten_params(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = np.asarray(v)
  return out


def unflatten_params(flat: dict[str, np.ndarray]) -> dict:
  out: dict = {}
  for key, v in flat.items():
    *path, leaf = key.split("/")
    node = out
    for p in path:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


def train_weights(split: dict, noise: float, seed: int) -> tuple[dict, dict]:
  """Trains cnn_small on the noisy labels (or loads the cached weights).

  Returns:
    ``(flat_params, info)``: {"Conv_0/kernel": ..., ...} float32 numpy arrays, and
    the training record (steps, seconds, accuracies).
  """
  path = weights_path(noise, seed)
  if path.exists():
    with np.load(path) as f:
      flat = {k: f[k] for k in f.files if not k.startswith("_")}
      info = {"cached": str(path.relative_to(ROOT)), "train_seconds": float(f["_seconds"])}
    return flat, info

  import jax
  import jax.numpy as jnp
  import optax

  from kdaif_jax import losses, models

  model = models.create(MODEL, NUM_CLASSES)
  x, y = jnp.asarray(split["x"]), jnp.asarray(split["y"])
  params, state = model.init(jax.random.key(seed), x[:1])
  opt = optax.adam(TRAIN["lr"])
  loss = lambda p, xb, yb: losses.cross_entropy(model.apply(p, state, xb, False)[0], yb).mean()

  @jax.jit
  def step(p, o, idx):
    g = jax.grad(loss)(p, x[idx], y[idx])
    u, o = opt.update(g, o, p)
    return optax.apply_updates(p, u), o

  o = opt.init(params)
  rng = np.random.default_rng(seed)
  n, b = len(split["x"]), TRAIN["batch"]
  perm, pos = rng.permutation(n), 0
  t0 = time.perf_counter()
  for _ in range(TRAIN["steps"]):
    if pos + b > n:
      perm, pos = rng.permutation(n), 0
    params, o = step(params, o, jnp.asarray(perm[pos : pos + b]))
    pos += b
  params = jax.block_until_ready(params)
  secs = time.perf_counter() - t0
  flat = flatten_params(params)
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, _seconds=np.float64(secs), **flat)
  return flat, {"cached": None, "train_seconds": secs}


def auroc(suspicious: np.ndarray, noisy: np.ndarray) -> float:
  """AUROC of ranking the flipped labels by ``suspicious`` (high = flipped)."""
  return float(roc_auc_score(np.asarray(noisy, bool), np.asarray(suspicious, np.float64)))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  return float(stats.spearmanr(np.asarray(a, np.float64), np.asarray(b, np.float64))[0])


def pearson(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.corrcoef(np.asarray(a, np.float64), np.asarray(b, np.float64))[0, 1])


def median_time(fn, repeats: int = 5, warmup: int = 1) -> dict:
  """Wall time of ``fn()`` (which must block until its result is ready): first call, median."""
  t0 = time.perf_counter()
  out = fn()
  first = time.perf_counter() - t0
  for _ in range(max(warmup, 1) - 1):
    out = fn()
  times = []
  for _ in range(max(repeats, 1)):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return {
    "first_s": first,
    "median_s": float(np.median(times)),
    "min_s": float(np.min(times)),
    "times_s": [round(t, 4) for t in times],
    "out": out,
  }
