"""Text for GLUE: tokenisers, pre-trained BERT files (Hugging Face layout), metrics.

tokenize.py   load_tokenizer (tokenizer.json / vocab.txt), train_tokenizer
              (WordPiece from scratch), pack (ids, types, mask as [N, 3, L])
weights.py    minilm_dir (the packaged all-MiniLM-L6-v2), load_params,
              save_pretrained, encode (last hidden states for sentences)
metrics.py    each GLUE task's official metrics (scikit-learn / scipy)
"""

from kdaif_jax.text.weights import encode, load_params, minilm_dir, save_pretrained

__all__ = ["encode", "load_params", "minilm_dir", "save_pretrained"]
