"""The seams between the library and its callers.

The online steps and the whole-set scorer must compute exactly what
``influence.batch_influence`` computes on the global batch (on 1 and on 8
devices); nothing below the trainer reads a config; the report imports no
training module; source files stay short; the config -> records mapping.
"""

import ast
import inspect
import json
import os
import subprocess
import sys

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax

from kdaif_jax import config, influence, models, objectives, parallel, scoring
from kdaif_jax import step as step_lib
from kdaif_jax.parallel import BATCH, REPLICATED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "kdaif_jax")
B, V, K = 16, 8, 3

# float32 tolerances for "the same maths, another reduction order". On 8 devices g_V
# and every curvature product are 8 local means then a pmean instead of one mean over
# the 16 examples, a few ulps apart; 3 CG iterations carry that into s and the scores.
# Measured: |Δscore| <= 9e-8 for scores up to 0.29 (3e-7 of the largest; 1.3e-5
# relative on the smallest, -0.003), |Δs| <= 9e-8 for |s| up to 0.62, |Δw| <= 4e-7.
# The bound rtol 1e-4 + atol 1e-5·max|x| is ~30x that noise, while a real seam bug (a
# missing pmean, a local instead of a global mean, a wrong shard) moves scores by O(1)
# relative (e.g. the curvature of one device's 2 examples instead of 16: 0.35 vs -0.003).
RTOL, ATOL_REL = 1e-4, 1e-5


def _prepare(images):
  return images.astype(jnp.float32) / 255.0 - 0.5


def _problem(n=B, nv=V, key=0):
  """A tiny float32 KD problem: MLP student/teacher, a TrainState, a batch, a val batch."""
  cfg = config.base_config()
  cfg.kdaif.mechanism = "online"
  cfg.kdaif.cg_iters = 3
  cfg.kdaif.scope = "all"  # the full-network seam; the head scope: tests/test_scope.py
  teacher = models.create("mlp", K, hidden=16)
  student = models.create("mlp", K, hidden=8)
  k = jax.random.split(jax.random.key(key), 6)
  x = jax.random.randint(k[0], (n, 4, 4, 1), 0, 256).astype(jnp.uint8)
  y = jax.random.randint(k[1], (n,), 0, K)
  xv = jax.random.randint(k[2], (nv, 4, 4, 1), 0, 256).astype(jnp.uint8)
  yv = jax.random.randint(k[3], (nv,), 0, K)
  sample = jnp.zeros((1, 4, 4, 1))
  tp, tms = teacher.init(k[4], sample)
  sp, sms = student.init(k[5], sample)
  tx = optax.sgd(0.1)
  state = step_lib.new_train_state(
    key=jax.random.key_data(jax.random.key(1)),
    student=step_lib.NetState(sp, sms, tx.init(sp)),
    teacher=step_lib.NetState(tp, tms, tx.init(tp)),
    num_examples=n,
  )
  batch = {"images": x, "labels": y, "noisy": jnp.zeros((n,), bool), "weights": jnp.ones((n,))}
  val = {"images": xv, "labels": yv}
  return cfg, student, teacher, tx, state, batch, val


def _losses(student, teacher, state, kd, images, labels, val):
  """The step's training loss (KD on the teacher's inference logits) and validation loss."""
  stu, tea = state.student, state.teacher
  x = _prepare(images)
  t_logits = jax.lax.stop_gradient(teacher.apply(tea.params, tea.model_state, x, False)[0])
  train = objectives.training_loss(
    student, stu.model_state, x, lambda out: kd(out, t_logits, labels)
  )
  val_loss = objectives.validation_loss(
    student, stu.model_state, _prepare(val["images"]), val["labels"]
  )
  return train, val_loss


def _flat(tree):
  return np.asarray(jax.flatten_util.ravel_pytree(tree)[0])


def _fingerprint(state, batch, val):
  """A few numbers that tell whether two processes built the same problem."""
  return [
    float(np.sum(_flat(state.student.params).astype(np.float64))),
    float(np.sum(_flat(state.teacher.params).astype(np.float64))),
    int(np.sum(np.asarray(batch["images"], np.int64))),
    int(np.sum(np.asarray(val["images"], np.int64))),
    int(np.sum(np.asarray(batch["labels"]) * np.arange(B))),
  ]


def _run_sharded(num_devices):
  """The KD step and ``batch_influence`` itself under jit(shard_map) on a 'data' mesh."""
  cfg, student, teacher, tx, state, batch, val = _problem()
  opts = config.step_options(cfg)
  mesh = parallel.make_mesh(num_devices)
  step_fn = step_lib.make_kd_step(student, teacher, tx, None, _prepare, opts, axis_name="data")
  mapped = jax.jit(
    parallel.shard_map(step_fn, mesh, (REPLICATED, BATCH, BATCH), (REPLICATED, REPLICATED, BATCH))
  )
  rep, shard = parallel.replicate(state, mesh), jax.device_put((batch, val), parallel.sharded(mesh))
  new, metrics, (scores, weights, _) = mapped(rep, *shard)

  def lib(state, batch, val):
    train, val_loss = _losses(
      student, teacher, state, opts.kd, batch["images"], batch["labels"], val
    )
    res = influence.batch_influence(
      state.student.params,
      train,
      val_loss,
      x0=state.s,
      axis_name="data",
      **opts.influence.solver._asdict(),
    )
    return res.scores, res.s, res.info.iterations

  lib_fn = jax.jit(
    parallel.shard_map(lib, mesh, (REPLICATED, BATCH, BATCH), (BATCH, REPLICATED, REPLICATED))
  )
  lib_scores, lib_s, lib_iters = lib_fn(rep, *shard)
  return {
    "devices": int(mesh.shape["data"]),
    "fingerprint": _fingerprint(state, batch, val),
    "step": {
      "scores": np.asarray(scores).tolist(),
      "weights": np.asarray(weights).tolist(),
      "s": _flat(new.s).tolist(),
      "iterations": float(metrics["cg_iterations"]),
    },
    "lib": {
      "scores": np.asarray(lib_scores).tolist(),
      "s": _flat(lib_s).tolist(),
      "iterations": float(lib_iters),
    },
  }


_EIGHT = r"""
import json, sys
sys.path.insert(0, {root!r})
import jax
assert jax.device_count() == 8, jax.devices()
from tests.test_seam import _run_sharded
print("RESULT" + json.dumps(_run_sharded(8)))
"""


def _reference():
  """``influence.batch_influence`` on the whole batch, one device, no axis."""
  cfg, student, teacher, tx, state, batch, val = _problem()
  opts = config.step_options(cfg)

  @jax.jit
  def ref(state, batch, val):
    train, val_loss = _losses(
      student, teacher, state, opts.kd, batch["images"], batch["labels"], val
    )
    return influence.batch_influence(
      state.student.params, train, val_loss, x0=state.s, **opts.influence.solver._asdict()
    )

  res = ref(state, batch, val)
  weights = opts.influence.weights(res.scores)
  return res, weights, _fingerprint(state, batch, val)


def _check(got, ref, ref_weights, where):
  scores = np.asarray(ref.scores)
  atol = ATOL_REL * float(np.max(np.abs(scores)))
  s = _flat(ref.s)
  s_atol = ATOL_REL * float(np.max(np.abs(s)))
  iters = float(ref.info.iterations)
  for path in ("step", "lib"):
    out = got[path]
    np.testing.assert_allclose(
      out["scores"], scores, rtol=RTOL, atol=atol, err_msg=f"{where} {path} scores"
    )
    np.testing.assert_allclose(out["s"], s, rtol=RTOL, atol=s_atol, err_msg=f"{where} {path} s")
    assert out["iterations"] == iters, (where, path, out["iterations"], iters)
  np.testing.assert_allclose(
    got["step"]["weights"], ref_weights, rtol=RTOL, atol=ATOL_REL, err_msg=f"{where} weights"
  )


def test_sharded_step_scores_equal_batch_influence(eight_cpu_env):
  proc = subprocess.Popen(
    [sys.executable, "-c", _EIGHT.format(root=ROOT)],
    cwd=ROOT,
    env=eight_cpu_env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    ref, ref_weights, fingerprint = _reference()
    assert float(ref.info.iterations) == 3  # the test exercises a real 3-step CG solve
    assert float(jnp.std(ref.scores)) > 0
    one = _run_sharded(1)
    assert one["devices"] == 1
    _check(one, ref, ref_weights, "1 device")
    stdout, stderr = proc.communicate(timeout=600)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  assert proc.returncode == 0, stderr[-3000:]
  eight = json.loads(stdout.split("RESULT", 1)[1])
  assert eight["devices"] == 8
  np.testing.assert_allclose(eight["fingerprint"], fingerprint, rtol=1e-6)  # the same problem
  _check(eight, ref, ref_weights, "8 devices")


def _scored_arrays(batch, val):
  """The arrays a whole-set scorer reads (``loop.scored_arrays``' keys)."""
  return {
    "train_images": batch["images"],
    "train_labels": batch["labels"],
    "val_images": val["images"],
    "val_labels": val["labels"],
  }


def test_whole_set_scorer_equals_batch_influence():
  n, chunk, iters = 40, 16, 4  # 40 = 2 chunks of 16 + a wrapped last chunk
  cfg, student, teacher, tx, state, batch, val = _problem(n=n, nv=V, key=3)
  cfg.eval_batch_size = chunk
  cfg.kdaif.whole_set.cg_iters = iters
  cfg.kdaif.whole_set.curvature_size = 2 * n  # the whole set (a random permutation of it)
  opts = config.scorer_options(cfg)
  assert opts.solver.maxiter == iters and opts.total_iters == iters
  mesh = parallel.make_mesh(1)
  scorer = scoring.make_whole_set_scorer(student, teacher, _prepare, opts, mesh)
  arrays = _scored_arrays(batch, val)
  got, info = scorer(state, arrays, jax.random.key(7))

  @jax.jit
  def ref(state):
    train, val_loss = _losses(
      student, teacher, state, opts.kd, batch["images"], batch["labels"], val
    )
    return influence.batch_influence(
      state.student.params, train, val_loss, x0=None, **opts.solver._asdict()
    )

  res = ref(state)
  assert got.shape == (n,)
  assert int(info.iterations) == int(res.info.iterations) == iters
  # The curvature is a mean over the same 40 examples in another order: float32 noise only.
  scores = np.asarray(res.scores)
  atol = ATOL_REL * float(np.max(np.abs(scores)))
  np.testing.assert_allclose(got, scores, rtol=RTOL, atol=atol)


def test_teacher_scorer_equals_dense_head_oracle():
  """``kdaif.memory_init="teacher"``: influence on the teacher's own validation CE, in
  its classifier layer, against a float64 dense Gauss-Newton solve."""
  n, damping = 40, 0.1
  cfg, student, teacher, tx, state, batch, val = _problem(n=n, nv=V, key=5)
  cfg.eval_batch_size = 16  # 2 chunks and a wrapped last one
  cfg.kdaif.damping = damping
  cfg.kdaif.cg_tol = 0.0
  cfg.kdaif.whole_set.cg_iters = 80  # > the head's 51 parameters: CG is exact
  cfg.kdaif.whole_set.curvature_size = 2 * n  # the whole set
  cfg.kd.alpha = 0.3  # the teacher's loss ignores the KD mixture
  scorer = scoring.make_teacher_scorer(
    teacher, _prepare, config.scorer_options(cfg), parallel.make_mesh(1)
  )
  arrays = _scored_arrays(batch, val)
  got, info = scorer(state, arrays, jax.random.key(7))
  assert got.shape == (n,) and int(info.iterations) <= 80

  with jax.enable_x64(True):
    tp = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state.teacher.params)
    head = sorted(tp)[-1]  # the MLP's last Dense layer
    flat, unravel = jax.flatten_util.ravel_pytree(tp[head])
    x, xv = _prepare(batch["images"]), _prepare(val["images"])

    def logits(v, images):
      return teacher.apply({**tp, head: unravel(v)}, {}, images, False)[0]

    def ce(v, images, labels):
      out = logits(v, images)
      return jax.nn.logsumexp(out, axis=1) - jnp.take_along_axis(out, labels[:, None], 1)[:, 0]

    j3 = jax.jacobian(logits)(flat, x)  # [N, K, P]
    probs = jax.nn.softmax(logits(flat, x))
    h_out = jax.vmap(lambda p: jnp.diag(p) - jnp.outer(p, p))(probs)
    ggn = jnp.einsum("nkp,nkl,nlq->pq", j3, h_out, j3) / n
    g_v = jax.grad(lambda v: jnp.mean(ce(v, xv, val["labels"])))(flat)
    s = np.linalg.solve(np.asarray(ggn) + damping * np.eye(flat.size), np.asarray(g_v))
    per_ex = jax.jacobian(lambda v: ce(v, x, batch["labels"]))(flat)  # [N, P]
    expect = -np.asarray(per_ex) @ s
  np.testing.assert_allclose(got, expect, rtol=1e-3, atol=1e-4 * np.abs(expect).max())


def test_identity_solver_is_the_validation_gradient():
  cfg, student, teacher, tx, state, batch, val = _problem()
  kd = config.step_options(cfg).kd
  train, val_loss = _losses(student, teacher, state, kd, batch["images"], batch["labels"], val)
  params = state.student.params
  s, g_v, info = influence.solve_direction(params, train, val_loss, solver="identity")
  expect = jax.grad(val_loss)(params)
  assert int(info.iterations) == 0
  assert bool(info.finite)
  assert jax.tree.structure(s) == jax.tree.structure(expect)
  for a, b, c in zip(jax.tree.leaves(s), jax.tree.leaves(g_v), jax.tree.leaves(expect)):
    np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(a, b)
  assert np.any(_flat(expect) != 0)


# --------------------------------------------------------------------------
# Structure
# --------------------------------------------------------------------------


def _imports(path, root=ROOT):
  """Fully qualified names of every module ``path`` imports (anywhere in the file).

  ``from a.b import c`` yields both ``a.b`` and ``a.b.c`` (c may be a module);
  relative imports are resolved against the file's package.
  """
  rel = os.path.relpath(path, root)
  package = os.path.dirname(rel).replace(os.sep, ".").split(".")
  names = set()
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = package[: len(package) - node.level + 1] if node.level else []
      module = ".".join(base + ([node.module] if node.module else []))
      names.add(module)
      names.update(f"{module}.{alias.name}" for alias in node.names)
  return names


def _imports_any(path, modules, root=ROOT):
  return sorted(
    name for name in _imports(path, root) for m in modules if name == m or name.startswith(m + ".")
  )


BELOW_THE_TRAINER = [
  "step",
  "ssl",
  "scoring",
  "online",
  "objectives",
  "options",
  "loop",
  "influence",
  "weights",
  "losses",
]


def test_import_parser_sees_every_form(tmp_path):
  sub = tmp_path / "kdaif_jax" / "sub"
  sub.mkdir(parents=True)
  forms = [
    "from kdaif_jax import config",
    "from kdaif_jax import losses, config as c",
    "import kdaif_jax.config",
    "import kdaif_jax.config as cfg",
    "from kdaif_jax.config import step_options",
    "def f():\n  from kdaif_jax.config import base_config",
    "from .. import config",
    "from ..config import scorer_options",
  ]
  for i, form in enumerate(forms):
    f = sub / f"m{i}.py"
    f.write_text(form + "\n")
    assert _imports_any(str(f), ["kdaif_jax.config"], root=str(tmp_path)), form
  clean = sub / "clean.py"
  clean.write_text("from kdaif_jax import configs_like, losses\nimport kdaif_jax.configure\n")
  assert not _imports_any(str(clean), ["kdaif_jax.config"], root=str(tmp_path))


def test_no_config_below_the_trainer():
  for name in BELOW_THE_TRAINER:
    path = os.path.join(PKG, f"{name}.py")
    assert not _imports_any(path, ["kdaif_jax.config"]), f"kdaif_jax/{name}.py imports config"
  from kdaif_jax import ssl

  for fn in (step_lib.make_kd_step, ssl.make_ssl_step, scoring.make_whole_set_scorer):
    params = set(inspect.signature(fn).parameters)
    assert not params & {"cfg", "config"}, (fn.__qualname__, sorted(params))


def test_report_imports_no_training_module():
  report = os.path.join(PKG, "report")
  files = sorted(f for f in os.listdir(report) if f.endswith(".py"))
  assert "__init__.py" in files and len(files) > 1
  training = [
    f"kdaif_jax.{m}" for m in ("step", "ssl", "scoring", "loop", "trainer", "config", "online")
  ]
  for f in files:
    found = _imports_any(os.path.join(report, f), training)
    assert not found, f"kdaif_jax/report/{f} imports {found}"


def test_no_source_file_over_450_lines():
  long = {}
  for dirpath, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        with open(path) as fh:
          n = sum(1 for _ in fh)
        if n > 450:
          long[os.path.relpath(path, ROOT)] = n
  assert not long, f"source files over 450 lines: {long}"


# --------------------------------------------------------------------------
# Config -> records
# --------------------------------------------------------------------------

FLAGS = ("plain", "online", "joint", "frozen_weights", "proxy", "rescores", "small_loss", "oracle")
EXPECTED = {
  "none": {"plain"},
  "static": {"frozen_weights", "proxy"},
  "periodic": {"frozen_weights", "rescores"},
  "online": {"online"},
  "joint": {"online", "joint"},
  "small_loss": {"small_loss"},
  "oracle": {"frozen_weights", "oracle"},
}


def test_step_options_from_config():
  assert set(config.MECHANISMS) == set(EXPECTED)
  for name in config.MECHANISMS:
    cfg = config.base_config()
    cfg.kdaif.mechanism = name
    cfg.data.noise.rate = 0.2  # the oracle weighs by the injected flips
    cfg.kdaif.cg_iters = 7
    cfg.kdaif.damping = 0.25
    cfg.kdaif.curvature = "hessian"
    cfg.kdaif.cg_tol = 1e-4
    config.validate(cfg)
    opts = config.step_options(cfg)
    mech = opts.mechanism
    assert mech.name == name
    on = {flag for flag in FLAGS if getattr(mech, flag)}
    assert on == EXPECTED[name], (name, on)
    assert mech.batch_weights == (name in ("online", "joint", "small_loss"))
    solver = opts.influence.solver
    assert isinstance(solver, influence.SolverOptions)
    assert (solver.maxiter, solver.damping, solver.curvature) == (7, 0.25, "hessian")
    assert (solver.solver, solver.tol) == ("cg", 1e-4)
    assert solver.unroll is None  # "auto"
    assert opts.kd.temperature == cfg.kd.temperature and opts.kd.alpha == cfg.kd.alpha
    hash(opts)
    hash(config.scorer_options(cfg))
    assert config.step_options(cfg) == opts and hash(config.step_options(cfg)) == hash(opts)

  for option, unroll in (("auto", None), ("unroll", True), ("loop", False)):
    cfg = config.base_config()
    cfg.kdaif.unroll = option
    assert config.step_options(cfg).influence.solver.unroll is unroll
    assert config.scorer_options(cfg).solver.unroll is unroll

  cfg = config.base_config()
  cfg.kdaif.mechanism = "static"
  proxy = config.step_options(cfg, mechanism="none")
  assert proxy.mechanism.name == "none" and proxy.mechanism.plain
  assert not any(getattr(proxy.mechanism, flag) for flag in FLAGS if flag != "plain")
  assert config.step_options(cfg).mechanism.proxy


def test_whole_set_damping_reaches_the_scorer_only():
  # kdaif.whole_set.damping (None: kdaif.damping) sets the whole-set scorer's damping
  # and leaves the per-step solver's alone; its placeholder survives the smoke variant.
  cfg = config.smoke(config.base_config())
  cfg.kdaif.damping = 0.25
  assert cfg.kdaif.whole_set.damping is None
  assert config.scorer_options(cfg).solver.damping == 0.25
  cfg.kdaif.whole_set.damping = 1e-3
  config.validate(cfg)
  assert config.scorer_options(cfg).solver.damping == 1e-3
  assert config.step_options(cfg).influence.solver.damping == 0.25
  assert config.whole_set_damping(cfg) == 1e-3
