"""The PyTorch side: the same cnn_small as a torch module, and our algorithm in torch.func.

``TorchCNN`` mirrors ``kdaif_jax.models.cnn.CNN(widths=(16, 32))`` (two 3x3 SAME
convolutions per stage, ReLU, a 2x2 max pool between stages, global average
pooling, a dense head); ``load_flax`` copies the Flax weights into it (Flax convs
are HWIO and NHWC, torch's OIHW and NCHW; Flax dense kernels are [in, out], torch's
[out, in]).

``TorchFuncInfluence`` is the computation of ``ours.influence_fn`` written with
``torch.func`` (``functional_call``, ``grad``, ``jvp``, ``vjp``): g_V by ``grad``;
the Gauss-Newton product Jᵀ H_out J v with the network's vjp taken once and reused
(``vjp`` keeps its graph) and J v by one ``jvp`` per product (forward-mode AD), the
output-space Hessian by a ``jvp`` of the loss gradient in the logits; the same CG
as ``kdaif_jax.solvers.cg_solve`` (damping added to the product, relative-residual
stop at tol 1e-6, at most ``maxiter`` products); the scores by ONE ``jvp`` of the
per-example losses along s.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, linearize, vjp


class TorchCNN(nn.Module):
  """cnn_small in torch (NCHW input)."""

  def __init__(self, num_classes: int = 10, widths=(16, 32), in_channels: int = 1):
    super().__init__()
    layers, c = [], in_channels
    for stage, w in enumerate(widths):
      if stage > 0:
        layers.append(nn.MaxPool2d(2, 2))
      for _ in range(2):
        layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU()]
        c = w
    self.features = nn.Sequential(*layers)
    self.head = nn.Linear(c, num_classes)

  def forward(self, x):
    return self.head(self.features(x).mean(dim=(2, 3)))


def load_flax(model: TorchCNN, flat: dict[str, np.ndarray]) -> TorchCNN:
  """Copies Flax params ({"Conv_0/kernel": HWIO, ..., "Dense_0/kernel": [in, out]})."""
  convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
  with torch.no_grad():
    for i, conv in enumerate(convs):
      conv.weight.copy_(torch.from_numpy(np.transpose(flat[f"Conv_{i}/kernel"], (3, 2, 0, 1))))
      conv.bias.copy_(torch.from_numpy(flat[f"Conv_{i}/bias"]))
    model.head.weight.copy_(torch.from_numpy(flat["Dense_0/kernel"].T.copy()))
    model.head.bias.copy_(torch.from_numpy(flat["Dense_0/bias"]))
  return model


def nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _dot(a: dict, b: dict) -> torch.Tensor:
  return sum(torch.vdot(a[k].reshape(-1), b[k].reshape(-1)) for k in a)


class TorchFuncInfluence:
  """Influence of every training example on the mean validation loss, in torch.func."""

  def __init__(self, model: TorchCNN, split: dict):
    self.model = model.eval()
    self.params = {k: v.detach() for k, v in model.named_parameters()}
    self.x, self.y = nchw(split["x"]), torch.from_numpy(split["y"]).long()
    self.xv, self.yv = nchw(split["xv"]), torch.from_numpy(split["yv"]).long()

  def logits(self, p, x):
    return functional_call(self.model, p, (x,))

  def train_loss(self, p):
    return F.cross_entropy(self.logits(p, self.x), self.y)

  def per_example(self, p):
    return F.cross_entropy(self.logits(p, self.x), self.y, reduction="none")

  def grad_train(self):
    """The unit of cost: the gradient of the mean training loss over the whole split."""
    return grad(self.train_loss)(self.params)

  def make_gnvp(self, jv: str = "jvp"):
    """``v -> Jᵀ H_out J v`` of the mean training loss; the network's vjp taken once.

    Args:
      jv: how J v is formed: "jvp" (one forward-mode ``jvp`` per product) or
        "linearize" (``torch.func.linearize`` once: the jvp traced to a graph of
        its linear part, replayed per product).
    """
    f = lambda p: self.logits(p, self.x)
    out, vjp_fn = vjp(f, self.params)
    out = out.detach()
    gout = grad(lambda o: F.cross_entropy(o, self.y))
    if jv == "linearize":
      _, jvp_fn = linearize(f, self.params)
    elif jv == "jvp":
      jvp_fn = lambda v: jvp(f, (self.params,), (v,))[1]
    else:
      raise ValueError(f"jv={jv!r}; allowed: jvp, linearize")

    def matvec(v):
      _, hjv = jvp(gout, (out,), (jvp_fn(v),))
      return vjp_fn(hjv)[0]

    return matvec

  def cg(self, matvec, b, damping, maxiter, tol=1e-6):
    """``cg_solve``'s CG (relative-residual stop, damping added to the product)."""
    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = {k: v.clone() for k, v in b.items()}
    p = {k: v.clone() for k, v in b.items()}
    bb = _dot(b, b)
    rr = bb
    it = 0
    while it < maxiter and rr > (tol * tol) * bb:
      mp = matvec(p)
      ap = {k: mp[k] + damping * p[k] for k in p}
      pap = _dot(p, ap)
      if pap <= 0:
        break
      alpha = rr / pap
      for k in x:
        x[k].add_(p[k], alpha=alpha)
        r[k].add_(ap[k], alpha=-alpha)
      rr_new = _dot(r, r)
      beta = rr_new / rr
      for k in p:
        p[k] = r[k] + beta * p[k]
      rr = rr_new
      it += 1
    return x, {"iterations": it, "residual": float(torch.sqrt(rr / bb))}

  def scores(self, s):
    """I_i = -∇ℓ_iᵀ s for all i by one jvp."""
    _, t = jvp(self.per_example, (self.params,), (s,))
    return -t

  def run(self, damping: float = 0.1, maxiter: int = 20, jv: str = "jvp"):
    """``(scores [N] numpy, info)``: g_V, CG on the Gauss-Newton, one jvp."""
    g_v = grad(lambda p: F.cross_entropy(self.logits(p, self.xv), self.yv))(self.params)
    s, info = self.cg(self.make_gnvp(jv), g_v, damping, maxiter)
    return self.scores(s).detach().numpy(), info
