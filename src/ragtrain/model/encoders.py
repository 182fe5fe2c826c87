"""Question / context encoders: any Hugging Face encoder plus pooling and optional L2 normalisation.

Works with DPR checkpoints (``DPRQuestionEncoder``/``DPRContextEncoder``), BERT, MiniLM and the like.
``pooling``: ``pooler`` (the model's pooler output: DPR's projection / BERT's tanh layer), ``cls`` (first token
of the last hidden state) or ``mean`` (attention-masked mean, the native setting of sentence-transformers models
such as all-MiniLM-L6-v2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Encoder(nn.Module):
    """Wraps a Hugging Face encoder; ``forward`` returns one vector per input row."""

    def __init__(self, model: nn.Module, pooling: str = "cls", normalize: bool = False):
        super().__init__()
        if pooling not in ("pooler", "cls", "mean"):
            raise ValueError(f"unknown pooling {pooling!r}")
        self.model = model
        self.pooling = pooling
        self.normalize = normalize
        self._is_dpr = type(model).__name__.startswith("DPR")

    @property
    def dim(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "projection_dim", 0) or cfg.hidden_size) if self.pooling == "pooler" \
            else int(cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        need_hidden = self._is_dpr and self.pooling != "pooler"
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=need_hidden,
                         return_dict=True)
        if self.pooling == "pooler":
            emb = out.pooler_output
            if emb is None:
                raise ValueError(f"{type(self.model).__name__} has no pooler output; use pooling=cls or mean")
        else:
            hidden = out.hidden_states[-1] if need_hidden else out.last_hidden_state
            if self.pooling == "cls":
                emb = hidden[:, 0]
            else:
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        if self.normalize:
            emb = F.normalize(emb, dim=-1)
        return emb
