"""Generator adapters: per-token target log-likelihoods and generation for causal and seq2seq LMs.

Both kinds expose the same two calls, so the RAG module never branches on the architecture:

* :meth:`Generator.target_logprobs` -> ``(N, T)`` log p(y_t | x, z, y_<t) for the answer tokens of each of the
  ``N = batch x n_docs`` (question, passage) rows; prompt tokens never enter the loss.
* :meth:`Generator.generate` -> generated token ids for each row.

Causal-LM rows are laid out ``[left padding][prompt][answer + eos][right padding]`` with every prompt ending at
the same column, so the answer tokens of all rows sit in the same ``T`` columns and only ``T + 1`` positions of
logits are ever materialised (``logits_to_keep``) -- the vocabulary projection of the prompt is skipped.
"""

from __future__ import annotations

import torch
from torch import nn


class Generator(nn.Module):
    def __init__(self, model: nn.Module, is_seq2seq: bool):
        super().__init__()
        self.model = model
        self.is_seq2seq = is_seq2seq

    @property
    def config(self):
        return self.model.config

    def target_logprobs(self, batch: dict) -> torch.Tensor:
        """``batch``: ``gen_input_ids``/``gen_attention_mask`` (N, L), ``target_ids`` (N, T) (pad where masked).

        Returns ``(N, T)`` float32 token log-probabilities (garbage where ``target_mask`` is 0)."""
        target = batch["target_ids"]
        if self.is_seq2seq:
            # target_mask is per question (B, T); target rows are per (question, passage) (B*K, T)
            tmask = batch["target_mask"]
            if tmask.shape[0] != target.shape[0]:
                tmask = tmask.repeat_interleave(target.shape[0] // tmask.shape[0], dim=0)
            labels = target.masked_fill(tmask == 0, -100)
            decoder_input_ids = self.model.prepare_decoder_input_ids_from_labels(labels=labels)
            logits = self.model(input_ids=batch["gen_input_ids"], attention_mask=batch["gen_attention_mask"],
                                decoder_input_ids=decoder_input_ids, use_cache=False).logits
        else:
            mask = batch["gen_attention_mask"]
            position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
            t = target.shape[1]
            logits = self.model(input_ids=batch["gen_input_ids"], attention_mask=mask, position_ids=position_ids,
                                use_cache=False, logits_to_keep=t + 1).logits[:, :t]
        logp = torch.log_softmax(logits.float(), dim=-1)
        return logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, num_beams: int = 1,
                 max_new_tokens: int = 24, pad_token_id: int | None = None, eos_token_id: int | None = None,
                 synced_gpus: bool = False) -> torch.Tensor:
        """Greedy (``num_beams=1``) or beam search; returns only the new tokens, (N, <= max_new_tokens)."""
        kwargs = dict(num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=False,
                      pad_token_id=pad_token_id, eos_token_id=eos_token_id, synced_gpus=synced_gpus)
        if self.is_seq2seq:
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            return out
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return out[:, input_ids.shape[1]:]
