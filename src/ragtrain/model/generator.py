"""Generator adapters: per-token target log-likelihoods and generation for causal and seq2seq LMs.

Both kinds expose the same two calls, so the RAG module never branches on the architecture:

* :meth:`Generator.target_logprobs` -> ``(N, T)`` log p(y_t | x, z, y_<t) for the answer tokens of each of the
  ``N = batch x n_docs`` (question, passage) rows; prompt tokens never enter the loss.
* :meth:`Generator.generate` -> generated token ids for each row.

Causal-LM rows are laid out ``[left padding][prompt][answer + eos][right padding]`` with every prompt ending at
the same column, so the answer tokens of all rows sit in the same ``T`` columns and only ``T + 1`` positions
reach the output head (``logits_to_keep``) -- the vocabulary projection of the prompt is skipped.  For both kinds
a pre-hook on the output head then keeps only the real answer tokens (answers are padded to the longest of the
batch), so the vocabulary projection, its log-softmax and their backward never run on padding.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


@contextlib.contextmanager
def only_rows(head: nn.Module, keep: torch.Tensor):
    """While active, ``head`` (the LM's output projection) sees only the hidden states at ``keep`` (a bool mask
    over the leading dims of its input), so a (N, T, d) input gives (keep.sum(), vocab) logits."""
    def pre_hook(_module, args):
        return (args[0][keep], *args[1:])

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


class Generator(nn.Module):
    def __init__(self, model: nn.Module, is_seq2seq: bool, buckets: int = 1):
        super().__init__()
        self.model = model
        self.is_seq2seq = is_seq2seq
        self.buckets = buckets

    @property
    def config(self):
        return self.model.config

    def target_logprobs(self, batch: dict) -> torch.Tensor:
        """``batch``: ``gen_input_ids``/``gen_attention_mask`` (N, L), ``target_ids`` (N, T) (pad where masked),
        ``target_mask`` (N, T) or per question (B, T) with N = B * K.

        Returns ``(N, T)`` float32 token log-probabilities, 0 where ``target_mask`` is 0: the vocabulary
        projection and its log-softmax run on the answer tokens only, not on padding.  With ``buckets`` > 1 the
        rows, sorted by input length, run in that many forward calls, each trimmed to its own longest row; always
        exactly ``buckets`` calls (ZeRO-3 ranks must make the same number), an empty bucket re-running one row."""
        n = batch["target_ids"].shape[0]
        tmask = batch["target_mask"]
        if tmask.shape[0] != n:  # per question -> per (question, passage) row
            tmask = tmask.repeat_interleave(n // tmask.shape[0], dim=0)
        if self.buckets <= 1:
            return self._target_logprobs(batch["gen_input_ids"], batch["gen_attention_mask"], batch["target_ids"],
                                         tmask)
        mask = batch["gen_attention_mask"]
        out = None
        for rows, part, cols in self.bucket_plan(mask):
            lp = self._target_logprobs(batch["gen_input_ids"][part, cols], mask[part, cols],
                                       batch["target_ids"][part], tmask[part])
            out = lp.new_zeros((n, lp.shape[1])) if out is None else out
            if len(rows):
                out = out.index_copy(0, rows, lp)
        return out

    def bucket_plan(self, mask: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, slice]]:
        """``(rows, rows_run, columns)`` of each of the ``buckets`` forward calls for an (N, L) attention mask:
        rows sorted by length and split evenly; ``rows_run`` = ``rows``, or one stand-in row for an empty bucket;
        the columns trimmed to the bucket's longest row."""
        order = torch.argsort(mask.sum(-1), stable=True)
        plan = []
        for rows in torch.tensor_split(order, max(self.buckets, 1)):
            part = rows if len(rows) else order[:1]
            used = mask[part].any(0).nonzero().flatten()
            # seq2seq inputs are right-padded: cut the right; causal prompts are left-padded with the answer
            # columns last (logits_to_keep counts from the end): cut the left only
            cols = slice(0, int(used[-1]) + 1) if self.is_seq2seq else slice(int(used[0]), mask.shape[1])
            plan.append((rows, part, cols))
        return plan

    def _target_logprobs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target: torch.Tensor,
                         tmask: torch.Tensor) -> torch.Tensor:
        n, t = target.shape
        keep = tmask.bool()
        if self.is_seq2seq:
            labels = target.masked_fill(~keep, -100)
            decoder_input_ids = self.model.prepare_decoder_input_ids_from_labels(labels=labels)
            with only_rows(self.model.get_output_embeddings(), keep):
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                    decoder_input_ids=decoder_input_ids, use_cache=False).logits
        else:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            # logits_to_keep=t+1 keeps the last t+1 positions; the first t of them predict the t answer columns
            with only_rows(self.model.get_output_embeddings(), F.pad(keep, (0, 1))):
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=False, logits_to_keep=t + 1).logits
        if logits.shape[:-1] != (int(keep.sum()),):
            raise RuntimeError(f"{type(self.model).__name__}: expected logits for the {int(keep.sum())} answer "
                               f"tokens only, got shape {tuple(logits.shape)} (its output head is not the last op)")
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target[keep].unsqueeze(-1)).squeeze(-1)
        return logp.new_zeros((n, t)).masked_scatter(keep, logp)

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
