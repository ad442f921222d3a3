"""Tokenisers (the ``tokenizers`` library) and packing text into model batches.

A tokenizer comes from a directory's ``tokenizer.json``, or its ``vocab.txt``
(BERT's uncased WordPiece pipeline), or is trained from scratch as WordPiece on
the task's training text, so that everything runs offline without pre-trained
files. Text is packed as one int32 array [N, 3, L] (token ids, token types,
attention mask) with L the smallest length bucket that holds the longest
sequence, so jit compiles one of a handful of shapes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # [PAD] = id 0
LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512)


class TokenizerNotFoundError(FileNotFoundError):
  """A tokenizer directory holds neither tokenizer.json nor vocab.txt."""


def _bert_pipeline(tok):
  """BERT's uncased normaliser, pre-tokeniser, [CLS] A [SEP] B [SEP] template, decoder."""
  from tokenizers import decoders, normalizers, pre_tokenizers, processors

  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
  tok.post_processor = processors.TemplateProcessing(
    single="[CLS] $A [SEP]",
    pair="[CLS] $A [SEP] $B:1 [SEP]:1",
    special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
  )
  tok.decoder = decoders.WordPiece()
  return tok


def load_tokenizer(directory: str | os.PathLike[str]):
  """The tokenizer of a pre-trained directory (Hugging Face layout).

  Args:
    directory: holds ``tokenizer.json`` (preferred) or ``vocab.txt``.

  Returns:
    A ``tokenizers.Tokenizer`` producing [CLS] A [SEP] (B [SEP]) with token types.

  Raises:
    TokenizerNotFoundError: neither file is there (one line naming the directory).
  """
  from tokenizers import Tokenizer, models

  path = os.fspath(directory)
  if os.path.isfile(os.path.join(path, "tokenizer.json")):
    return Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
  if os.path.isfile(os.path.join(path, "vocab.txt")):
    wordpiece = models.WordPiece.from_file(os.path.join(path, "vocab.txt"), unk_token="[UNK]")
    return _bert_pipeline(Tokenizer(wordpiece))
  raise TokenizerNotFoundError(f"{path} holds neither tokenizer.json nor vocab.txt")


def train_tokenizer(texts: Sequence[str], vocab_size: int = 8000):
  """A WordPiece tokenizer trained on ``texts`` (no pre-trained files needed).

  Args:
    texts: training sentences.
    vocab_size: the largest vocabulary (special tokens included; [PAD] is id 0).

  Returns:
    A ``tokenizers.Tokenizer`` with BERT's uncased pipeline.
  """
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

  tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  trainer = trainers.WordPieceTrainer(
    vocab_size=int(vocab_size), special_tokens=list(SPECIAL_TOKENS), show_progress=False
  )
  tok.train_from_iterator(list(texts), trainer=trainer)
  return _bert_pipeline(tok)


def bucket_length(longest: int, max_length: int) -> int:
  """The padded length for sequences of at most ``longest`` tokens.

  Args:
    longest: the longest tokenised sequence.
    max_length: the truncation length (an upper bound on the result).

  Returns:
    The smallest of ``LENGTH_BUCKETS`` >= ``longest``, capped at ``max_length``.
  """
  for b in LENGTH_BUCKETS:
    if b >= longest:
      return min(b, max_length)
  return max_length


def token_lengths(images: np.ndarray) -> np.ndarray:
  """[N] real tokens of each packed example [N, 3, L] (the sum of its attention mask)."""
  return np.asarray(images)[:, 2, :].sum(axis=-1)


def batch_length(lengths: np.ndarray, idx: np.ndarray, padded: int) -> int:
  """The padded length of one batch: ``bucket_length`` of its longest example.

  Args:
    lengths: [N] ``token_lengths`` of the split.
    idx: the batch's example indices (or a boolean mask) into ``lengths``.
    padded: the split's padded length L (an upper bound on the result).

  Returns:
    The smallest of ``LENGTH_BUCKETS`` that holds the batch, at most ``padded``.
  """
  return bucket_length(int(np.asarray(lengths)[idx].max()), padded)


def pack(
  tokenizer,
  first: Sequence[str],
  second: Sequence[str] | None = None,
  *,
  max_length: int = 128,
  length: int | None = None,
) -> np.ndarray:
  """Tokenises sentences (or pairs), truncates and pads them into one array.

  Args:
    tokenizer: a ``tokenizers.Tokenizer``.
    first: N sentences.
    second: N second sentences of pairs, or None.
    max_length: truncation length in tokens, special tokens included (pairs are
      truncated longest-first).
    length: the padded length L; None: ``bucket_length`` of the longest.

  Returns:
    int32 [N, 3, L]: token ids, token types and the attention mask (1 = real).
  """
  tok = tokenizer
  tok.no_padding()
  tok.enable_truncation(max_length=int(max_length))
  if second is None:
    encs = tok.encode_batch(list(first))
  else:
    if len(second) != len(first):
      raise ValueError(f"{len(first)} first sentences but {len(second)} second ones")
    encs = tok.encode_batch(list(zip(first, second)))
  longest = max((len(e.ids) for e in encs), default=1)
  size = bucket_length(longest, max_length) if length is None else int(length)
  out = np.zeros((len(encs), 3, size), np.int32)
  for i, e in enumerate(encs):
    n = min(len(e.ids), size)
    out[i, 0, :n] = e.ids[:n]
    out[i, 1, :n] = e.type_ids[:n]
    out[i, 2, :n] = 1
  return out
