"""The RAG module: one ``nn.Module`` holding the question encoder, the context encoder and the generator.

It holds no distributed code.  Retrieval is a callable the caller passes to :meth:`RagModel.forward`: the
trainer's retriever searches the index (on rank 0 under several processes), fetches the passages and tokenizes
them; the module only encodes, scores and marginalises.  One module means one optimizer with a parameter group
per sub-model and one DeepSpeed engine under ZeRO.

Modes (which sub-models learn and where passage vectors come from):

================  =========  ============  ============  ===========================================
mode              generator  question enc  context enc   passage vectors for p(z|x)
================  =========  ============  ============  ===========================================
end2end           trained    trained       trained       retrieved passages re-encoded live (grad)
original          trained    trained       frozen        stored index embeddings (no grad)
generator_only    trained    frozen        frozen        stored index embeddings
retriever_only    frozen     trained       trained       re-encoded live
================  =========  ============  ============  ===========================================
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from ragtrain.model.encoders import Encoder
from ragtrain.model.generator import Generator
from ragtrain.model.losses import contrastive_retrieval_loss, rag_nll

TRAINABLE = {
    "end2end": ("generator", "question_encoder", "context_encoder"),
    "original": ("generator", "question_encoder"),
    "generator_only": ("generator",),
    "retriever_only": ("question_encoder", "context_encoder"),
}

# retrieve(question_embeddings (B, d) detached, live_context, with_gold) -> dict of tensors:
#   doc_ids (B, K) (-1 on retriever padding), optional doc_mask (B, K) bool (False: padding, p(z|x) = 0);
#   doc_embeddings (B, K, d) when not live_context; ctx_input_ids / ctx_attention_mask (B*K, L)
#   when live_context, or (U, L) for U unique passages plus ctx_index (B*K,) = the row of each retrieved slot
#   (a passage retrieved for several questions is encoded once; the gradients of its slots add up);
#   gen_input_ids / gen_attention_mask (B*K, L), target_ids / target_mask (B, T);
#   with_gold: gold_ids (B,) and gold_input_ids / gold_attention_mask (live) or gold_embeddings (B, d).
Retrieve = Callable[[torch.Tensor, bool, bool], dict]


@dataclass
class RagOutput:
    loss: torch.Tensor  # scalar: mean NLL + weight * retrieval loss
    nll: torch.Tensor  # (B,) per-question marginal NLL
    retrieval_loss: torch.Tensor  # scalar (0 when off)
    doc_scores: torch.Tensor  # (B, K)
    doc_ids: torch.Tensor  # (B, K)
    n_tokens: torch.Tensor | None = None  # scalar: answer tokens in the batch (the NLL is summed over them)


class RagModel(nn.Module):
    def __init__(self, question_encoder: Encoder, context_encoder: Encoder, generator: Generator, *,
                 mode: str = "end2end", loss_type: str = "sequence", n_docs: int = 5,
                 retrieval_loss_weight: float = 0.0, retrieval_temperature: float = 1.0):
        super().__init__()
        self.question_encoder = question_encoder
        self.context_encoder = context_encoder
        self.generator = generator
        self.loss_type = loss_type
        self.n_docs = n_docs
        self.retrieval_loss_weight = retrieval_loss_weight
        self.retrieval_temperature = retrieval_temperature
        self.mode = ""
        self.set_mode(mode)

    # ------------------------------------------------------------------------------------------ modes
    def set_mode(self, mode: str) -> None:
        if mode not in TRAINABLE:
            raise ValueError(f"unknown mode {mode!r} (choose from {', '.join(TRAINABLE)})")
        self.mode = mode
        for name in ("generator", "question_encoder", "context_encoder"):
            sub = getattr(self, name)
            trained = name in TRAINABLE[mode]
            lora = hasattr(sub.model, "peft_config")  # LoRA-wrapped: only the adapters learn
            for pname, p in sub.named_parameters():
                p.requires_grad_(trained and (not lora or "lora_" in pname))

    def is_trained(self, name: str) -> bool:
        return name in TRAINABLE[self.mode]

    @property
    def live_context(self) -> bool:
        """Whether retrieved passages are re-encoded by the (trained) context encoder inside the step."""
        return self.is_trained("context_encoder")

    def _grad_ctx(self, name: str):
        return contextlib.nullcontext() if self.is_trained(name) else torch.no_grad()

    # -------------------------------------------------------------------------------------- encoding
    def encode_questions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.question_encoder(input_ids, attention_mask)

    def encode_passages(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.context_encoder(input_ids, attention_mask)

    def doc_scores(self, q: torch.Tensor, c: torch.Tensor, doc_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The retrieval logits: ``q`` (B, d) . ``c`` (B, K, d) / ``retrieval_temperature``, float32, so that
        p(z|x) = softmax over K; ``doc_mask`` (B, K) False on retriever padding (FAISS id -1) -> -inf (p = 0).
        Training and decoding (:mod:`ragtrain.eval.decoding`) both take p(z|x) from here."""
        scores = torch.einsum("bd,bkd->bk", q.float(), c.float()) / self.retrieval_temperature
        if doc_mask is not None:
            scores = scores.masked_fill(~doc_mask.to(scores.device), float("-inf"))
        return scores

    # --------------------------------------------------------------------------------------- forward
    def forward(self, q_input_ids: torch.Tensor, q_attention_mask: torch.Tensor, retrieve: Retrieve,
                with_gold: Optional[bool] = None) -> RagOutput:
        with_gold = self.retrieval_loss_weight > 0 if with_gold is None else with_gold
        with self._grad_ctx("question_encoder"):
            q = self.encode_questions(q_input_ids, q_attention_mask)
        b = q.shape[0]
        docs = retrieve(q.detach(), self.live_context, with_gold)
        k = docs["doc_ids"].shape[1]
        if self.live_context:
            c = self.encode_passages(docs["ctx_input_ids"], docs["ctx_attention_mask"])
            if "ctx_index" in docs:  # rows of unique passages -> the (b, k) retrieved slots
                c = c[docs["ctx_index"].reshape(-1)]
            c = c.view(b, k, -1)
        else:
            c = docs["doc_embeddings"].to(device=q.device, dtype=q.dtype)
        doc_scores = self.doc_scores(q, c, docs.get("doc_mask"))

        with self._grad_ctx("generator"):
            token_logprobs = self.generator.target_logprobs(docs).view(b, k, -1)
        nll = rag_nll(self.loss_type, token_logprobs, docs["target_mask"], doc_scores)
        loss = nll.mean()

        retrieval_loss = loss.new_zeros(())
        if with_gold and "gold_ids" in docs:
            if self.live_context:
                gold = self.encode_passages(docs["gold_input_ids"], docs["gold_attention_mask"])
            else:
                gold = docs["gold_embeddings"].to(device=q.device, dtype=q.dtype)
            candidates = torch.cat([gold.float(), c.reshape(b * k, -1).float()])
            candidate_ids = torch.cat([docs["gold_ids"], docs["doc_ids"].reshape(-1)])
            retrieval_loss = contrastive_retrieval_loss(q.float(), candidates, candidate_ids, docs["gold_ids"],
                                                        self.retrieval_temperature)
            if self.retrieval_loss_weight > 0:
                loss = loss + self.retrieval_loss_weight * retrieval_loss
        return RagOutput(loss=loss, nll=nll, retrieval_loss=retrieval_loss.detach(), doc_scores=doc_scores,
                         doc_ids=docs["doc_ids"], n_tokens=docs["target_mask"].sum().detach())
