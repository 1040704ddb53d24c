"""Report tokenisation with a Hugging Face tokenizer loaded from a LOCAL directory (never downloaded).

Shards store token ids as int32 arrays of one fixed length (padded and truncated to ``max_length``) so
batches stack without a collate-time pad. The manifest records which tokenizer made them
(:func:`tokenizer_record`: name, path, vocabulary sha256, length, pad id); :func:`check_tokenizer`
compares that record with the text encoder a training run is configured with and stops with a clear
message before training when they differ (ids from another vocabulary would silently mean other words).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from aol_dist.errors import UserError


class TokenizerMismatch(UserError, ValueError):
    """Shards tokenised with another vocabulary (or not at all) than the model's text encoder expects."""


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
    """The tokenizer saved in directory ``path`` (``save_pretrained`` layout); cached per process."""
    if not Path(path).is_dir():
        raise FileNotFoundError(f"tokenizer {path!r}: not a local directory (tokenizers are never downloaded; "
                                f"save one with tokenizer.save_pretrained(DIR) and pass DIR)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"tokenizer {path!r}: cannot load a Hugging Face tokenizer from it ({e})") from None


def vocab_sha256(tokenizer: Any) -> str:
    """sha256 of the vocabulary as (token, id) pairs in id order: the same for the fast and slow classes
    and for copies of the files, different as soon as one id means another token."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()


def tokenizer_record(path: str | Path, max_length: int) -> dict[str, Any]:
    """What the manifest says about the tokenizer that made the shards' token ids."""
    if max_length < 2:
        raise ValueError("token max_length must be >= 2 (room for the special tokens)")
    tok = load_tokenizer(str(path))
    return {"name": Path(path).resolve().name, "path": str(Path(path).resolve()), "class": type(tok).__name__,
            "vocab_size": len(tok.get_vocab()), "vocab_sha256": vocab_sha256(tok), "max_length": int(max_length),
            "pad_token_id": int(tok.pad_token_id if tok.pad_token_id is not None else 0)}


def tokenize(text: str, path: str | Path, max_length: int) -> np.ndarray:
    """Report text -> int32 ids of exactly ``max_length`` (truncated, then padded with the pad id)."""
    tok = load_tokenizer(str(path))
    ids = tok(text, truncation=True, max_length=max_length, padding="max_length")["input_ids"]
    return np.asarray(ids, dtype=np.int32)


def check_tokenizer(manifest: dict[str, Any], tokenizer_path: str | Path | None, where: str = "shards") -> None:
    """Refuse to train or evaluate in image+text mode on shards tokenised differently.

    ``tokenizer_path`` is the run's text encoder directory (``model.text_encoder``; its tokenizer files),
    or empty/None for image-only runs, which need no tokens and pass. Raises :class:`TokenizerMismatch`.
    """
    if not tokenizer_path:
        return
    recorded = manifest.get("tokenizer")
    if not recorded:
        raise TokenizerMismatch(f"{where}: the model reads report text ({tokenizer_path}) but the shards hold no "
                                f"report tokens from a recorded tokenizer (the manifest's 'tokenizer' is empty); "
                                f"rebuild them with `aol shards ... --tokenizer {tokenizer_path}`")
    try:
        tok = load_tokenizer(str(tokenizer_path))
    except FileNotFoundError as e:
        raise TokenizerMismatch(f"{where}: {e}") from None
    mine = vocab_sha256(tok)
    if mine != recorded.get("vocab_sha256"):
        raise TokenizerMismatch(
            f"{where}: token ids were made by tokenizer {recorded.get('name')!r} (vocabulary sha256 "
            f"{str(recorded.get('vocab_sha256'))[:12]}..., {recorded.get('vocab_size')} tokens) but the text encoder "
            f"{tokenizer_path} has vocabulary sha256 {mine[:12]}... ({len(tok.get_vocab())} tokens); rebuild the "
            f"shards with `--tokenizer {tokenizer_path}` or point model.text_encoder at {recorded.get('path')}")
