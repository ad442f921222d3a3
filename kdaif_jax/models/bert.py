"""BERT-style Transformer encoders (Devlin et al., 2019) for GLUE, in Flax linen.

The module's parameter tree mirrors Hugging Face's ``BertModel`` names (see
``kdaif_jax.text.weights``), so pre-trained files map onto it one to one:

  embeddings   word / position / token-type embeddings, LayerNorm
  layers_i     self-attention (query, key, value, output, LayerNorm) and the MLP
               (intermediate, output, LayerNorm); post-LayerNorm as in BERT
  pooler       tanh dense layer on the [CLS] state
  classifier   dense head: K logits, or 1 output for regression (STS-B)

Input: one int array [B, 3, L] per batch (token ids, token types, attention mask
in 0/1), the form the data pipeline stores text in, so the trainer passes it
around like an image batch. No dropout: the forward pass stays deterministic
(``Model.apply`` takes no RNG), as for the image models.

Sizes (``MODELS``): ``bert_minilm`` is all-MiniLM-L6-v2's shape (6 layers,
hidden 384, 12 heads; 22.7M parameters with a 2-class head), ``bert_base``
BERT-base (12 layers, hidden 768; 109.5M); ``bert_minilm_l4/l2/l1`` and
``bert_base_l6`` are students with fewer layers of the same width (initialised
from a subset of the teacher's layers, ``kdaif_jax.text.weights``);
``bert_tiny`` (2 layers, hidden 32) is a random network for tests.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

VOCAB_SIZE = 30_522  # the uncased BERT WordPiece vocabulary (MiniLM and BERT-base)
# N(0, 0.02) for every weight matrix, as Hugging Face initialises BERT.
_INIT = nn.initializers.normal(0.02)


def unpack(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Splits a packed text batch into its three parts.

  Args:
    x: [B, 3, L] (any numeric dtype; float zeros from ``Model.init`` work).

  Returns:
    (token ids [B, L] int32, token types [B, L] int32, mask [B, L] bool).
  """
  x = x.astype(jnp.int32)
  return x[:, 0], x[:, 1], x[:, 2] > 0


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Scaled dot-product attention with a key padding mask.

  Args:
    q, k, v: [B, H, L, D].
    mask: [B, L] bool, True for real tokens (keys that may be attended to).

  Returns:
    [B, H, L, D]. A masked key gets weight exactly 0 for every query, so padded
    tokens change nothing at the real positions.
  """
  scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / jnp.sqrt(jnp.asarray(q.shape[-1], q.dtype))
  # A finite minimum, not -inf: a row with no real key (e.g. the zero sample of
  # init) then gives uniform weights instead of NaN.
  scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
  return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores, axis=-1), v)


class Embeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm."""

  vocab_size: int
  hidden: int
  max_position: int = 512
  type_vocab: int = 2
  eps: float = 1e-12

  @nn.compact
  def __call__(self, ids: jax.Array, types: jax.Array) -> jax.Array:
    """[B, L] ids and types -> [B, L, hidden]."""
    emb = lambda n, name: nn.Embed(n, self.hidden, embedding_init=_INIT, name=name)
    pos = jnp.arange(ids.shape[1])[None, :]
    x = (
      emb(self.vocab_size, "word_embeddings")(ids)
      + emb(self.max_position, "position_embeddings")(pos)
      + emb(self.type_vocab, "token_type_embeddings")(types)
    )
    return nn.LayerNorm(epsilon=self.eps, name="LayerNorm")(x)


class SelfAttention(nn.Module):
  """Multi-head self-attention with the output projection and post-LayerNorm."""

  hidden: int
  heads: int
  eps: float = 1e-12

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, L, hidden], mask [B, L] -> LayerNorm(x + attention(x)) [B, L, hidden]."""
    dense = lambda name: nn.Dense(self.hidden, kernel_init=_INIT, name=name)
    split = lambda t: einops.rearrange(t, "b l (h d) -> b h l d", h=self.heads)
    q, k, v = (split(dense(n)(x)) for n in ("query", "key", "value"))
    out = einops.rearrange(attention(q, k, v, mask), "b h l d -> b l (h d)")
    return nn.LayerNorm(epsilon=self.eps, name="LayerNorm")(x + dense("output")(out))


class Layer(nn.Module):
  """One Transformer layer: self-attention, then the GELU MLP, each post-LayerNorm."""

  hidden: int
  heads: int
  intermediate: int
  eps: float = 1e-12

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, L, hidden], mask [B, L] -> [B, L, hidden]."""
    x = SelfAttention(self.hidden, self.heads, self.eps, name="attention")(x, mask)
    # Hugging Face's "gelu" is the exact (erf) form.
    h = nn.gelu(nn.Dense(self.intermediate, kernel_init=_INIT, name="intermediate")(x), False)
    h = nn.Dense(self.hidden, kernel_init=_INIT, name="output")(h)
    return nn.LayerNorm(epsilon=self.eps, name="LayerNorm")(x + h)


class Bert(nn.Module):
  """A BERT encoder with pooler and a classification (or regression) head.

  Attributes:
    num_classes: outputs of the head (1 for regression).
    vocab_size, hidden, layers, heads, intermediate, max_position, type_vocab,
      eps: the encoder's sizes, as Hugging Face's config.json names them
      (vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
      intermediate_size, max_position_embeddings, type_vocab_size,
      layer_norm_eps).
  """

  num_classes: int
  vocab_size: int = VOCAB_SIZE
  hidden: int = 384
  layers: int = 6
  heads: int = 12
  intermediate: int = 1536
  max_position: int = 512
  type_vocab: int = 2
  eps: float = 1e-12

  def setup(self):
    if self.hidden % self.heads:
      raise ValueError(f"hidden={self.hidden} is not a multiple of heads={self.heads}")
    self.embeddings = Embeddings(
      self.vocab_size, self.hidden, self.max_position, self.type_vocab, self.eps
    )
    self.encoder = [
      Layer(self.hidden, self.heads, self.intermediate, self.eps, name=f"layers_{i}")
      for i in range(self.layers)
    ]
    self.pooler = nn.Dense(self.hidden, kernel_init=_INIT)
    self.classifier = nn.Dense(self.num_classes, kernel_init=_INIT)

  def hidden_states(self, x: jax.Array) -> jax.Array:
    """The last layer's states.

    Args:
      x: packed batch [B, 3, L] (ids, types, mask).

    Returns:
      [B, L, hidden] float32 (padded positions hold values that depend on
      nothing but their own token; mask them out).
    """
    ids, types, mask = unpack(x)
    if ids.shape[1] > self.max_position:
      raise ValueError(f"sequence length {ids.shape[1]} exceeds max_position={self.max_position}")
    h = self.embeddings(ids, types)
    for layer in self.encoder:
      h = layer(h, mask)
    return h

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    """Forward pass.

    Args:
      x: packed batch [B, 3, L].
      train: unused (no dropout, no batch statistics).

    Returns:
      logits [B, num_classes] float32 (the regression output for K = 1).
    """
    del train
    pooled = jnp.tanh(self.pooler(self.hidden_states(x)[:, 0]))
    return self.classifier(pooled)


def _sized(**sizes: Any) -> Callable[..., nn.Module]:
  return functools.partial(Bert, **sizes)


_MINILM = dict(hidden=384, heads=12, intermediate=1536)
_BASE = dict(hidden=768, heads=12, intermediate=3072)

# Registry entries: name -> constructor taking num_classes and keyword overrides.
MODELS: dict[str, Callable[..., nn.Module]] = {
  "bert_minilm": _sized(layers=6, **_MINILM),
  "bert_minilm_l4": _sized(layers=4, **_MINILM),
  "bert_minilm_l2": _sized(layers=2, **_MINILM),
  "bert_minilm_l1": _sized(layers=1, **_MINILM),
  "bert_base": _sized(layers=12, **_BASE),
  "bert_base_l6": _sized(layers=6, **_BASE),
  "bert_tiny": _sized(layers=2, hidden=32, heads=2, intermediate=64, max_position=128),
}
