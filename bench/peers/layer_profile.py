"""Where the time goes: cnn_small's layers, forward and forward + backward, JAX vs torch.

Each of the four convolutions (3x3 SAME, with ReLU, on the shapes it sees for the
whole training split) and the 2x2 max pool, timed alone in each framework
(median of ``repeats`` calls after one untimed call; JAX jitted), plus the whole
network's forward pass and its gradient. Shapes are NHWC for JAX and NCHW for
torch, each framework's native layout.
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

# (input H, W, C_in, C_out) of cnn_small's four convolutions on 8x8x1 digits.
CONVS = ((8, 1, 16), (8, 16, 16), (4, 16, 32), (4, 32, 32))


def _median_ms(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return round(1e3 * float(np.median(times)), 2)


def run(n: int, whole: dict, repeats: int = 10) -> dict:
  """Per-layer times in ms for a batch of ``n``.

  Args:
    n: batch size (the training split's).
    whole: {"jax_forward", "jax_grad", "torch_forward", "torch_grad"}: zero-argument
      callables of the whole network (each blocking until its result is ready).
    repeats: timed calls per entry.
  """
  out = {"jax": {}, "torch": {}}
  key = jax.random.key(0)
  for i, (hw, cin, cout) in enumerate(CONVS):
    xj = jax.random.normal(key, (n, hw, hw, cin))
    kj = jax.random.normal(key, (3, 3, cin, cout)) * 0.1
    conv = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    fwd = jax.jit(lambda x, k, conv=conv: jax.nn.relu(conv(x, k)))
    bwd = jax.jit(
      jax.grad(lambda x, k, conv=conv: jnp.sum(jax.nn.relu(conv(x, k)) ** 2), argnums=(0, 1))
    )
    name = f"conv{i} {hw}x{hw} {cin}->{cout}"
    out["jax"][f"{name} forward"] = _median_ms(
      lambda fwd=fwd, x=xj, k=kj: jax.block_until_ready(fwd(x, k)), repeats
    )
    out["jax"][f"{name} forward+backward"] = _median_ms(
      lambda bwd=bwd, x=xj, k=kj: jax.block_until_ready(bwd(x, k)), repeats
    )
    xt = torch.randn(n, cin, hw, hw, requires_grad=True)
    kt = (0.1 * torch.randn(cout, cin, 3, 3)).requires_grad_()

    def tfb(x=xt, k=kt):
      y = F.relu(F.conv2d(x, k, padding=1))
      return torch.autograd.grad((y**2).sum(), (x, k))

    with torch.no_grad():
      out["torch"][f"{name} forward"] = _median_ms(
        lambda x=xt, k=kt: F.relu(F.conv2d(x, k, padding=1)), repeats
      )
    out["torch"][f"{name} forward+backward"] = _median_ms(tfb, repeats)
  xj = jax.random.normal(key, (n, 8, 8, 16))
  pool = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
  pf, pb = jax.jit(pool), jax.jit(jax.grad(lambda x: jnp.sum(pool(x) ** 2)))
  out["jax"]["max pool forward"] = _median_ms(lambda: jax.block_until_ready(pf(xj)), repeats)
  out["jax"]["max pool forward+backward"] = _median_ms(
    lambda: jax.block_until_ready(pb(xj)), repeats
  )
  xt = torch.randn(n, 16, 8, 8, requires_grad=True)
  with torch.no_grad():
    out["torch"]["max pool forward"] = _median_ms(lambda: F.max_pool2d(xt, 2), repeats)
  out["torch"]["max pool forward+backward"] = _median_ms(
    lambda: torch.autograd.grad((F.max_pool2d(xt, 2) ** 2).sum(), xt), repeats
  )
  for side in ("jax", "torch"):
    out[side]["whole network forward"] = _median_ms(whole[f"{side}_forward"], repeats)
    out[side]["whole network gradient"] = _median_ms(whole[f"{side}_grad"], repeats)
  return out
