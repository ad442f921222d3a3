# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# <!-- This notebook's source is notebooks/influence_explorer.py (jupytext percent format).
#      Edit that file, then run `jupytext --sync notebooks/influence_explorer.py`
#      (or `jupytext --to ipynb`) to update the .ipynb. See notebooks/README.md. -->
# # Influence explorer: the `kdaif_jax.influence` library on your own model
#
# Influence functions (Koh & Liang, ICML 2017) answer: *how would the validation loss change if
# training example $i$ counted a little more?*
#
# $$I_i = -\nabla_\theta \ell_i(\theta)^\top\,
# (C + \lambda I)^{-1}\, \nabla_\theta L_V(\theta)$$
#
# with $C$ the curvature of the training loss (Hessian or Gauss-Newton) and $\lambda$ a damping.
# $I_i < 0$: up-weighting example $i$ lowers the validation loss (it helps); $I_i > 0$: it hurts.
#
# 1. the building blocks (`hvp`, `make_gnvp` + `cg_solve`, `scores`) on a Flax model defined here;
# 2. finding flipped labels in digits by their influence;
# 3. checking influence against actual leave-one-out retraining (logistic regression, float64).
#
# Everything runs offline on a CPU in a minute or two (`KDAIF_NOTEBOOK_SMALL=1`: seconds).

# %%
# Colab only: installs kdaif_jax. Anywhere else this cell does nothing (no network).
import importlib.util
import subprocess
import sys

# Where pip takes kdaif_jax from on Colab: the repository URL (replace <you>), or a wheel
# or a folder on a mounted Drive, e.g. "/content/drive/MyDrive/kdaif_jax".
KDAIF_SOURCE = "git+https://github.com/<you>/kdaif_jax"


def on_colab() -> bool:
  if "google.colab" in sys.modules:
    return True
  try:
    return importlib.util.find_spec("google.colab") is not None
  except (ImportError, ValueError):  # no `google` package at all
    return False


ON_COLAB = on_colab()
if ON_COLAB and importlib.util.find_spec("kdaif_jax") is None:
  if "<you>" in KDAIF_SOURCE:
    raise ValueError("Set KDAIF_SOURCE above to where kdaif_jax can be installed from.")
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", KDAIF_SOURCE], check=True)
  print("Installed kdaif_jax. If pip changed the jax version, restart the session once.")
print("on Colab:", ON_COLAB)

# %%
import os

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from sklearn.datasets import load_digits

from kdaif_jax import data, influence, losses, metrics, weights

SMALL = os.environ.get("KDAIF_NOTEBOOK_SMALL") == "1"
NUM_TRAIN = 300 if SMALL else 0  # digits training examples (0: all 1,238)
TRAIN_STEPS = 150 if SMALL else 400  # Adam steps of part 2
LOO_TRAIN = 100 if SMALL else 250  # logistic-regression training set of part 3
LOO_COUNT = 10 if SMALL else 40  # examples retrained without, part 3
print(f"jax {jax.__version__} on {jax.default_backend()}, SMALL={SMALL}")

# %% [markdown]
# ## Data: digits with 20% flipped labels
#
# `data.load` builds the splits from scikit-learn's bundled 8×8 digits: a clean, class-balanced
# validation slice of the training split (200 images), the training examples, 20% of whose labels
# are replaced by a random other class, and the test split. `ds.train.noisy` marks the flipped
# ones; training never sees it.

# %%
cfg = data.default_data_config()
cfg.num_train = NUM_TRAIN
cfg.noise.rate = 0.2
cfg.noise.kind = "symmetric"
ds = data.load(cfg)


def inputs(split):
  return data.normalize(split.images, ds.mean, ds.std)  # float32 [N, 8, 8, 1]


x_train, y_train = inputs(ds.train), jnp.asarray(ds.train.labels)
x_val, y_val = inputs(ds.val), jnp.asarray(ds.val.labels)
noisy = np.asarray(ds.train.noisy)
print(f"train {x_train.shape}, {noisy.sum()} flipped; val {x_val.shape}; test {len(ds.test)}")


# %% [markdown]
# ## Part 1: the building blocks on your own Flax model
#
# Any `flax.linen` module works: the library only sees pure functions of the `params` pytree.


# %%
class TinyNet(nn.Module):
  """Flatten -> Dense(hidden) -> tanh -> Dense(classes)."""

  hidden: int = 64
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    x = nn.tanh(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(x)


net = TinyNet()
params = net.init(jax.random.key(0), x_train[:1])["params"]


def logits_fn(p, x):
  return net.apply({"params": p}, x)


def per_example_loss(p, x, y):  # [B] cross-entropies
  return losses.cross_entropy(logits_fn(p, x), y)


def mean_loss(p, x, y):  # scalar
  return jnp.mean(per_example_loss(p, x, y))


print("parameter shapes:", jax.tree.map(jnp.shape, params))
print("parameters:", influence.flatten(params).size)

# %% [markdown]
# **Hessian-vector product.** `influence.hvp(f, params, v, *args)` computes $\nabla^2 f \cdot v$
# by forward-over-reverse differentiation: exact, about the cost of 1.5 gradients, and the
# $P \times P$ Hessian is never built. The **Gauss-Newton** product $J^\top H_{out} J\, v$
# (`make_gnvp`) replaces the Hessian by a matrix that is positive semi-definite for any network,
# so conjugate gradient on it is stable; it is the library's default curvature.

# %%
xb, yb = x_train[:32], y_train[:32]  # one training batch
v = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape), params)

hv = influence.hvp(mean_loss, params, v, xb, yb)
G = influence.make_gnvp(
  lambda p: logits_fn(p, xb), lambda out: jnp.mean(losses.cross_entropy(out, yb)), params
)
gv = G(v)
vdot = lambda a, b: float(influence.flatten(a) @ influence.flatten(b))
print("H v shapes:", jax.tree.map(jnp.shape, hv))
print(f"v^T H v = {vdot(v, hv):.4f}   v^T G v = {vdot(v, gv):.4f} (always >= 0)")

# %% [markdown]
# **Inverse solve.** `cg_solve(matvec, b, damping=λ)` solves $(C + \lambda I)\,s = b$ by conjugate
# gradient on pytrees; here $b = \nabla L_V$, the validation gradient. `info` reports the
# iterations used, the relative residual and whether negative curvature was met.

# %%
g_val = jax.grad(mean_loss)(params, x_val, y_val)
s, info = influence.cg_solve(G, g_val, damping=0.1, maxiter=50, tol=1e-5)
check = jax.tree.map(lambda a, b: a + 0.1 * b, G(s), s)  # (G + λI) s, should equal g_val
rel = np.linalg.norm(influence.flatten(check) - influence.flatten(g_val)) / np.linalg.norm(
  influence.flatten(g_val)
)
print(
  f"CG: {int(info.iterations)} iterations, residual {float(info.residual):.2e} "
  f"(recomputed: {rel:.2e}), negative curvature: {bool(info.negative_curvature)}"
)

# %% [markdown]
# **Scores.** `scores(per_example_loss, params, s, *args)` returns all $B$ influences
# $I_i = -\nabla\ell_i^\top s$ from **one** forward-mode product (`jax.jvp` of the loss vector
# along $s$), without ever forming per-example gradients. Below: the same numbers from explicit
# per-example gradients (`vmap(grad)`, $B$ times the memory), and from `batch_influence`, which
# does the three steps in one call.

# %%
I_batch = influence.scores(per_example_loss, params, s, xb, yb)

one = lambda p, x, y: per_example_loss(p, x[None], y[None])[0]
grads = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, xb, yb)
grad_matrix = jnp.concatenate([g.reshape(len(yb), -1) for g in jax.tree.leaves(grads)], axis=1)
I_explicit = -grad_matrix @ influence.flatten(s)

full = influence.batch_influence(
  params,
  influence.PerExampleLoss(lambda p: logits_fn(p, xb), lambda out: losses.cross_entropy(out, yb)),
  lambda p: mean_loss(p, x_val, y_val),
  curvature="ggn",
  damping=0.1,
  maxiter=50,
  tol=1e-5,
)

scale = float(jnp.max(jnp.abs(I_explicit)))
jvp_vs_explicit = float(jnp.max(jnp.abs(I_batch - I_explicit))) / scale
jvp_vs_batch_influence = float(jnp.max(jnp.abs(I_batch - full.scores))) / scale
print("scores shape:", I_batch.shape, " first five:", np.round(np.asarray(I_batch[:5]), 5))
print(
  f"max relative difference: jvp vs explicit gradients {jvp_vs_explicit:.1e}, "
  f"vs batch_influence {jvp_vs_batch_influence:.1e}"
)
print(
  "weights (sigmoid map) of the first five:", np.round(np.asarray(weights.sigmoid(I_batch)[:5]), 3)
)

# %% [markdown]
# ## Part 2: finding flipped labels by their influence
#
# Train the model for a few hundred Adam steps on the noisy labels (stopping early, before it
# memorises them), then compute the influence of **every** training example on the clean
# validation loss: one CG solve $s = (G + \lambda I)^{-1}\nabla L_V$ with the Gauss-Newton
# matrix of the whole training set, then `scores` chunk by chunk with that one $s$. A flipped
# label pulls the model away from what the validation set wants, so it should get a large
# positive influence.

# %%
tx = optax.adam(3e-3)


@jax.jit
def train_step(p, opt_state, x, y):
  loss, g = jax.value_and_grad(mean_loss)(p, x, y)
  updates, opt_state = tx.update(g, opt_state, p)
  return optax.apply_updates(p, updates), opt_state, loss


p = net.init(jax.random.key(0), x_train[:1])["params"]
opt_state = tx.init(p)
rng = np.random.default_rng(0)
for _ in range(TRAIN_STEPS):
  idx = rng.choice(len(y_train), size=min(128, len(y_train)), replace=False)
  p, opt_state, loss = train_step(p, opt_state, x_train[idx], y_train[idx])
trained = p


def accuracy(p, x, y):
  return float(jnp.mean(jnp.argmax(logits_fn(p, x), -1) == y))


train_loss = float(mean_loss(trained, x_train, y_train))
print(
  f"{TRAIN_STEPS} steps: training loss (noisy labels) {train_loss:.3f}, "
  f"val accuracy {accuracy(trained, x_val, y_val):.3f}, test accuracy "
  f"{accuracy(trained, inputs(ds.test), jnp.asarray(ds.test.labels)):.3f}"
)

# %%
DAMPING = 0.1


@jax.jit
def solve(p):
  g_v = jax.grad(mean_loss)(p, x_val, y_val)
  curvature = influence.make_gnvp(
    lambda q: logits_fn(q, x_train), lambda out: jnp.mean(losses.cross_entropy(out, y_train)), p
  )
  # unroll=False: a while loop that stops at convergence (cheap for a dense model).
  return influence.cg_solve(curvature, g_v, damping=DAMPING, maxiter=100, tol=1e-5, unroll=False)


s_all, info_all = solve(trained)
print(
  f"whole-set CG: {int(info_all.iterations)} iterations, residual {float(info_all.residual):.1e}"
)

score_chunk = jax.jit(lambda p, s, x, y: influence.scores(per_example_loss, p, s, x, y))
CHUNK = 256
I_all = np.concatenate(
  [
    np.asarray(score_chunk(trained, s_all, x_train[i : i + CHUNK], y_train[i : i + CHUNK]))
    for i in range(0, len(y_train), CHUNK)
  ]
)
print("influence of every training example:", I_all.shape)

# %% [markdown]
# `metrics.detection_metrics(weights, noisy)` measures how well **low** weights find the flipped
# labels, so we pass $-I$ (high influence = suspicious). AUROC 0.5 is chance. Precision@k: the
# share of flipped labels among the k most harmful examples (chance = 20%).

# %%
det = metrics.detection_metrics(-I_all, noisy)
order = np.argsort(-I_all)  # most harmful first
k_all = int(noisy.sum())
top_k = {k: float(noisy[order[:k]].mean()) for k in (10, 25, 50, k_all) if k <= len(order)}
print(
  f"AUROC {det['auroc']:.3f}; precision@{k_all} (k = number flipped) {det['precision_at_k']:.3f}"
)
for k, prec in top_k.items():
  print(f"  top {k:4d} most harmful: {prec:.0%} flipped")
w_all = np.asarray(weights.sigmoid(jnp.asarray(I_all)))
print(
  f"KD-AIF sigmoid weights: mean {w_all[~noisy].mean():.2f} on clean, "
  f"{w_all[noisy].mean():.2f} on flipped labels"
)

fig, ax = plt.subplots(1, 2, figsize=(11, 3.5))
bins = np.linspace(np.percentile(I_all, 0.5), np.percentile(I_all, 99.5), 50)
ax[0].hist(I_all[~noisy], bins=bins, alpha=0.6, label="clean", density=True)
ax[0].hist(I_all[noisy], bins=bins, alpha=0.6, label="flipped", density=True)
ax[0].set(xlabel="influence $I_i$ on the validation loss (> 0: harmful)", ylabel="density")
ax[0].legend()
ks = np.arange(1, len(order) + 1)
ax[1].plot(ks, np.cumsum(noisy[order]) / ks, label="influence ranking")
ax[1].axhline(noisy.mean(), color="gray", ls="--", label="chance")
ax[1].set(xlabel="k (most harmful first)", ylabel="precision@k", ylim=(0, 1.05))
ax[1].legend()
plt.tight_layout()
plt.show()

# %%
# The 12 most harmful training images: given label (red when flipped) and true label.
fig, axes = plt.subplots(1, 12, figsize=(14, 1.9))
for a, i in zip(axes, order[:12], strict=True):
  a.imshow(ds.train.images[i, :, :, 0], cmap="gray_r")
  flipped = bool(noisy[i])
  true = f"\n(true {ds.train.clean_labels[i]})" if flipped else "\n"
  a.set_title(f"y={ds.train.labels[i]}{true}", color="red" if flipped else "black", fontsize=9)
  a.axis("off")
plt.show()

# %% [markdown]
# ## Part 3: influence predicts leave-one-out retraining
#
# The classic check (Koh & Liang, Fig. 2): on a convex model, influence should predict how much
# the validation loss changes when an example is **removed** and the model retrained. We use
# L2-regularised logistic regression on two digit classes (3 vs 8), in float64, trained to
# machine precision by Newton's method. With the training objective
# $R(\theta) = \sum_j \ell_j(\theta) + \tfrac{\mu}{2}\lVert\theta\rVert^2$ and
# $C = \nabla^2 R / n$ (the curvature of the mean), removing example $i$ changes the validation
# loss by approximately $-I_i / n$.

# %%
digits = load_digits()
keep = np.isin(digits.target, [3, 8])
X = digits.data[keep] / 16.0
Y = np.where(digits.target[keep] == 8, 1.0, -1.0)
perm = np.random.default_rng(0).permutation(len(Y))
X, Y = X[perm], Y[perm]
n = LOO_TRAIN
MU = 0.01 * n  # L2 strength in the sum form (= 0.01 on the mean loss)


def lr_per_example(p, x, y):  # logistic loss log(1 + exp(-y z)), y in {-1, +1}
  return jnp.logaddexp(0.0, -y * (x @ p["w"] + p["b"]))


def objective(p, x, y, mask):  # mask_i = 0 removes example i
  l2 = jnp.sum(p["w"] ** 2) + p["b"] ** 2
  return jnp.sum(mask * lr_per_example(p, x, y)) + 0.5 * MU * l2


@jax.jit
def newton(p, x, y, mask):
  """15 full Newton steps (plenty from a nearby start); returns params and |grad|."""
  flat, unravel = jax.flatten_util.ravel_pytree(p)
  f = lambda t: objective(unravel(t), x, y, mask)
  for _ in range(15):
    flat = flat - jnp.linalg.solve(jax.hessian(f)(flat), jax.grad(f)(flat))
  return unravel(flat), jnp.linalg.norm(jax.grad(f)(flat))


with jax.enable_x64(True):
  x, y = jnp.asarray(X[:n]), jnp.asarray(Y[:n])
  xv, yv = jnp.asarray(X[n:]), jnp.asarray(Y[n:])
  p0 = {"w": jnp.zeros(x.shape[1]), "b": jnp.zeros(())}
  theta, gnorm = newton(p0, x, y, jnp.ones(n))
  val_loss = lambda p: jnp.mean(lr_per_example(p, xv, yv))

  # s = (∇²R / n)^-1 ∇L_V by CG on exact Hessian-vector products (no damping: R is convex).
  H = influence.make_hvp(lambda p: objective(p, x, y, jnp.ones(n)) / n, theta)
  s_lr, info_lr = influence.cg_solve(
    H, jax.grad(val_loss)(theta), maxiter=200, tol=1e-12, unroll=False
  )
  I_lr = np.asarray(influence.scores(lr_per_example, theta, s_lr, x, y))
  predicted_all = -I_lr / n

  # Retrain without each chosen example: the half with the largest |I|, and random others.
  top = np.argsort(-np.abs(I_lr))[: LOO_COUNT // 2]
  others = np.setdiff1d(np.arange(n), top)
  chosen = np.concatenate(
    [top, np.random.default_rng(1).choice(others, LOO_COUNT - len(top), replace=False)]
  )
  masks = jnp.ones((len(chosen), n)).at[jnp.arange(len(chosen)), chosen].set(0.0)
  loo_params, loo_gnorm = jax.vmap(newton, in_axes=(None, None, None, 0))(theta, x, y, masks)
  actual = np.asarray(jax.vmap(val_loss)(loo_params)) - float(val_loss(theta))
  dtype = str(x.dtype)
  opt_gnorm, loo_gnorm_max = float(gnorm), float(jnp.max(loo_gnorm))

predicted = predicted_all[chosen]
pearson = float(np.corrcoef(predicted, actual)[0, 1])
print(
  f"{dtype}: {n} training / {len(yv)} validation examples; |grad R| at the optimum "
  f"{opt_gnorm:.1e}, after retraining <= {loo_gnorm_max:.1e}"
)
print(f"CG: {int(info_lr.iterations)} iterations, residual {float(info_lr.residual):.1e}")
print(
  f"Pearson r (predicted vs actual change of the validation loss, {len(chosen)} "
  f"examples): {pearson:.4f}"
)

fig, ax = plt.subplots(figsize=(5, 5))
ax.scatter(1e3 * actual, 1e3 * predicted, s=18)
lim = 1e3 * np.abs(np.concatenate([actual, predicted])).max() * 1.1
ax.plot([-lim, lim], [-lim, lim], color="gray", lw=1, ls="--", label="y = x")
ax.set(
  xlim=(-lim, lim),
  ylim=(-lim, lim),
  xlabel=r"actual $\Delta L_V$ (retrained), $\times 10^{-3}$",
  ylabel=r"predicted $\Delta L_V = -I_i / n$, $\times 10^{-3}$",
  title=f"remove one example: Pearson r = {pearson:.3f}",
)
ax.legend()
plt.tight_layout()
plt.show()

# %%
# One JSON line with the headline numbers (tests/test_notebooks.py reads it).
import json
import sys

result = {
  "python": sys.executable,
  "small": SMALL,
  "part1": {
    "cg_iterations": int(info.iterations),
    "cg_residual": float(info.residual),
    "jvp_vs_explicit": jvp_vs_explicit,
    "jvp_vs_batch_influence": jvp_vs_batch_influence,
    "gauss_newton_quadratic_form": vdot(v, gv),
  },
  "part2": {
    "num_train": int(len(noisy)),
    "num_flipped": int(noisy.sum()),
    "cg_residual": float(info_all.residual),
    "auroc": det["auroc"],
    "precision_at_k": det["precision_at_k"],
    "top_k": top_k,
  },
  "part3": {
    "dtype": dtype,
    "loo_count": len(chosen),
    "pearson_r": pearson,
    "max_grad_norm": max(opt_gnorm, loo_gnorm_max),
  },
}
print("KDAIF_RESULT " + json.dumps(result))
