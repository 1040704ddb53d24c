"""Frozen report encoder for image+text mode (Sec. 3.3): token ids -> pooled vector.

A Hugging Face BERT-family checkpoint loaded from a local directory (BioBERT in the paper; a tiny
randomly initialised BERT in tests), always in eval mode and without gradients. It is not part of
theta: the two FC-512 layers on its output are (``aol_dist.model.backbone.TextHead``). Because it is
frozen, its output for a sample never changes, so it can be cached per sample.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn


class ReportEncoder(nn.Module):
    def __init__(self, path: str | Path, cache: bool = True) -> None:
        super().__init__()
        from transformers import AutoModel

        if not Path(path).is_dir():
            raise FileNotFoundError(f"text encoder: no local checkpoint directory {path} (nothing is downloaded)")
        self.encoder = AutoModel.from_pretrained(str(path), local_files_only=True)
        self.encoder.eval().requires_grad_(False)
        self.pad_id = int(getattr(self.encoder.config, "pad_token_id", 0) or 0)
        self.out_dim = int(self.encoder.config.hidden_size)
        self.cache: dict[str, torch.Tensor] | None = {} if cache else None

    def train(self, mode: bool = True) -> "ReportEncoder":
        return super().train(False)  # frozen: always eval mode (no dropout)

    @torch.no_grad()
    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (B, L), padded with the pad id -> pooled vectors (B, hidden)."""
        tokens = tokens.long()
        out = self.encoder(input_ids=tokens, attention_mask=(tokens != self.pad_id).long())
        pooled = getattr(out, "pooler_output", None)
        return pooled if pooled is not None else out.last_hidden_state[:, 0]

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, keys: Sequence[str] | None = None) -> torch.Tensor:
        """Pooled vectors, served from the per-sample cache where ``keys`` are given and seen before."""
        if self.cache is None or keys is None:
            return self.encode(tokens)
        missing = [i for i, k in enumerate(keys) if k not in self.cache]
        if missing:
            fresh = self.encode(tokens[missing])
            for i, v in zip(missing, fresh):
                self.cache[keys[i]] = v.to(torch.float16)
        return torch.stack([self.cache[k] for k in keys]).to(tokens.device, torch.float32)
