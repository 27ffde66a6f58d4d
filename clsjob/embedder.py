"""Sentence embeddings from an encoder folder, for choosing each row's few-shot examples
(backend.prompt.shots.select: similar): the mean of the last hidden states over the row's
real tokens, the pooling all-MiniLM-L6-v2 and all-mpnet-base-v2 were trained with. Rows are
tokenised, length-sorted and micro-batched by the same code as the hf back end."""
from __future__ import annotations

import os

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from clsjob import model_cache
from clsjob.backends.hf import encode_truncating, length_sorted_batches, padded

MAX_LENGTH = 256  # the sentence-transformers encoders' own cap (MiniLM: 256, mpnet: 384)
MICRO_BATCH = 32


class Embedder:
    def __init__(self, folder: str, device: str = "cpu"):
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder, use_safetensors=True).to(device).eval()
        self.device = device

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> np.ndarray:
        """rows x hidden, float32, in the order given."""
        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        if not texts:
            return out
        encoded, _ = encode_truncating(self.tokenizer, texts, MAX_LENGTH)
        for batch in length_sorted_batches([len(ids) for ids in encoded], MICRO_BATCH):
            inputs = padded(self.tokenizer, [encoded[i] for i in batch]).to(self.device)
            hidden = self.model(**inputs).last_hidden_state.float()
            mask = inputs["attention_mask"].unsqueeze(-1).float()
            out[batch] = (hidden * mask).sum(1).div(mask.sum(1).clamp(min=1)).cpu().numpy()
        return out


def embed_pool(folder: str, texts: list[str], storage) -> np.ndarray:
    """A shots pool's vectors, in a Ray task of its own (once per job): the embedder folder
    (local or s3://, through the node's model cache) on every core of the node it lands on,
    as actors starting their engines beside it use them little."""
    torch.set_num_threads(os.cpu_count() or 1)
    local = model_cache.local_model(folder, storage, key="backend.prompt.shots.embedder")
    return Embedder(local)(texts)
