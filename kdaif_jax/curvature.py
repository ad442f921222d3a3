"""Curvature-vector products over pytrees: Hessian and Gauss-Newton.

Re-exported by ``kdaif_jax.influence``; see its docstring for the maths.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from kdaif_jax import _checks

__all__ = ["CURVATURES", "curvature_matvec", "gnvp", "hvp", "make_gnvp", "make_hvp"]

PyTree = Any
Matvec = Callable[[PyTree], PyTree]

CURVATURES = ("ggn", "hessian")


def hvp(f: Callable[..., jax.Array], params: PyTree, v: PyTree, *args, **kwargs) -> PyTree:
  """Hessian-vector product ∇²_θ f(θ, *args) · v by forward-over-reverse.

  Computed as ``jax.jvp(jax.grad(f), (θ,), (v,))[1]``: about 1.5x the cost of
  one gradient, exact (no finite differences).

  Args:
    f: scalar function ``f(params, *args, **kwargs) -> []``.
    params: pytree θ at which the Hessian is taken.
    v: pytree with the same structure, shapes and dtypes as ``params``.
    *args, **kwargs: extra arguments of ``f`` (not differentiated).

  Returns:
    Pytree like ``params``: H v.

  Raises:
    ValueError: ``params`` not floating point, ``v`` not matching ``params``,
      ``f`` not scalar, or (for concrete, i.e. not traced, inputs) NaN or inf
      in ``params`` or ``v``. Under ``jit`` values are not checked: see the
      README's "Library input checks".
  """
  _check_params(params)
  _checks.check_tree_match(params, v, "v", "params")
  _checks.check_finite_tree(v, "v")
  _checks.check_scalar_fn(f, "f", params, *args, **kwargs)
  grad_f = lambda p: jax.grad(f)(p, *args, **kwargs)
  return jax.jvp(grad_f, (params,), (v,))[1]


def make_hvp(f: Callable[[PyTree], jax.Array], params: PyTree) -> Matvec:
  """Returns ``v -> ∇²f(params) v`` with the gradient linearised once.

  ``jax.linearize`` runs the forward and backward pass of ``grad f`` once and
  keeps its residuals, so each later product costs only the linear part. Use
  this when many products share one ``params`` (an iterative solve).

  Args:
    f: scalar function of ``params`` alone (close over data).
    params: pytree θ.

  Returns:
    A linear function mapping a pytree like ``params`` to H v.

  Raises:
    ValueError: as ``hvp`` for ``params`` and ``f``.
  """
  _check_params(params)
  _checks.check_scalar_fn(f, "f", params)
  _, lin = jax.linearize(jax.grad(f), params)
  return _checked_matvec(lin, params)


def make_gnvp(
  outputs_fn: Callable[[PyTree], Any],
  loss_fn: Callable[[Any], jax.Array],
  params: PyTree,
) -> Matvec:
  """Returns the Gauss-Newton product ``v -> Jᵀ H_out J v``, linearised once.

  For a loss of the form L(θ) = loss_fn(outputs_fn(θ)), the generalised
  Gauss-Newton matrix is G = Jᵀ H_out J with J = ∂outputs/∂θ and H_out the
  Hessian of ``loss_fn`` in the outputs. For convex ``loss_fn`` (cross-entropy,
  KL, squared error) G is positive semi-definite whatever the network, so CG
  on G + λI is stable (Martens 2010; Schraudolph 2002).

  The model is linearised once (one forward pass, residuals kept); each
  product then costs one linear forward (J v), one output-space HVP and one
  transposed linear pass (Jᵀ u).

  Args:
    outputs_fn: ``params -> outputs`` (e.g. logits [B, K]); close over inputs.
    loss_fn: ``outputs -> []`` scalar loss; close over targets.
    params: pytree θ.

  Returns:
    A linear function mapping a pytree like ``params`` to G v.

  Raises:
    ValueError: as ``hvp`` for ``params``; ``loss_fn`` not scalar.
  """
  _check_params(params)
  outputs, jvp_fn = jax.linearize(outputs_fn, params)
  _checks.check_scalar_fn(loss_fn, "loss_fn", outputs)
  vjp_fn = jax.linear_transpose(jvp_fn, params)
  _, out_hvp = jax.linearize(jax.grad(loss_fn), outputs)

  def matvec(v):
    return vjp_fn(out_hvp(jvp_fn(v)))[0]

  return _checked_matvec(matvec, params)


def gnvp(
  outputs_fn: Callable[[PyTree], Any],
  loss_fn: Callable[[Any], jax.Array],
  params: PyTree,
  v: PyTree,
) -> PyTree:
  """Gauss-Newton vector product Jᵀ H_out J v (always PSD for convex losses).

  Args:
    outputs_fn: ``params -> outputs`` (e.g. logits [B, K]).
    loss_fn: ``outputs -> []`` scalar loss of the outputs.
    params: pytree θ.
    v: pytree like ``params``.

  Returns:
    Pytree like ``params``: G v with G = Jᵀ ∇²loss_fn(outputs) J.

  Raises:
    ValueError: as ``hvp`` for ``params`` and ``v``; ``loss_fn`` not scalar.
  """
  _check_params(params)
  _checks.check_tree_match(params, v, "v", "params")
  _checks.check_finite_tree(v, "v")
  outputs, jv = jax.jvp(outputs_fn, (params,), (v,))
  _checks.check_scalar_fn(loss_fn, "loss_fn", outputs)
  hjv = jax.jvp(jax.grad(loss_fn), (outputs,), (jv,))[1]
  _, vjp_fn = jax.vjp(outputs_fn, params)
  return vjp_fn(hjv)[0]


def _check_params(params: PyTree) -> None:
  """Floating-point leaves (always) and finite values (when concrete)."""
  _checks.check_float_tree(params, "params")
  _checks.check_finite_tree(params, "params")


def _checked_matvec(fn: Matvec, params: PyTree) -> Matvec:
  def matvec(v):
    _checks.check_tree_match(params, v, "v", "params")
    return fn(v)

  return matvec


def curvature_matvec(train_loss, params: PyTree, curvature: str = "ggn") -> Matvec:
  """The curvature of the mean training loss as a linear map, linearised once.

  Args:
    train_loss: the batch loss split at the outputs (``influence.PerExampleLoss``:
      ``outputs_fn`` and a per-example ``loss_fn``).
    params: pytree θ.
    curvature: "ggn" (Gauss-Newton, PSD) or "hessian" (exact, may be indefinite).

  Returns:
    ``v -> C v`` with C the curvature of mean_i ℓ_i(θ).
  """
  _checks.check_choice(curvature, "curvature", CURVATURES)
  mean_loss = lambda out: jnp.mean(train_loss.loss_fn(out))
  if curvature == "ggn":
    return make_gnvp(train_loss.outputs_fn, mean_loss, params)
  return make_hvp(lambda p: mean_loss(train_loss.outputs_fn(p)), params)
