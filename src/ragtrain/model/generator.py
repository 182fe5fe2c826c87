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
import inspect

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
                 synced_gpus: bool = False, stop_strings=None, tokenizer=None) -> torch.Tensor:
        """Greedy (``num_beams=1``) or beam search; returns only the new tokens, (N, <= max_new_tokens).
        ``stop_strings`` (with ``tokenizer``): a row stops once its text contains one (it is cut by the caller)."""
        kwargs = dict(num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=False,
                      pad_token_id=pad_token_id, eos_token_id=eos_token_id, synced_gpus=synced_gpus)
        if stop_strings:
            kwargs.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
        if self.is_seq2seq:
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            return out
        out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return out[:, input_ids.shape[1]:]

    @torch.no_grad()
    def generate_marginal(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, doc_logprobs: torch.Tensor, *,
                          max_new_tokens: int = 24, pad_token_id: int | None = None, eos_token_id: int | None = None,
                          synced_gpus: bool = False, output_scores: bool = False):
        """RAG-Token greedy decoding: ``input_ids``/``attention_mask`` hold the ``B * K`` (question, passage) prompts
        (b-major, causal prompts left-padded); ``doc_logprobs`` (B, K) is log p(z|x).  At every step the next token
        of question b is ``argmax_y sum_z p(z|x) p(y | x, z, y_<t)`` and is appended to all K of its rows (one
        KV cache per row).  Returns (B, <= max_new_tokens) new token ids, ``pad_token_id`` after a row's eos.
        ``synced_gpus`` (ZeRO-3, several ranks): always ``max_new_tokens`` forward calls, so ranks stay in step.
        ``output_scores``: also return the marginal log-probabilities of every step, (B, steps, vocab)."""
        b, k = doc_logprobs.shape
        n = input_ids.shape[0]
        if n != b * k:
            raise ValueError(f"generate_marginal: {n} prompt rows for {b} questions x {k} passages")
        pad = pad_token_id if pad_token_id is not None else 0
        doc_lp = doc_logprobs.float().to(input_ids.device).unsqueeze(-1)  # (B, K, 1)
        mask = attention_mask
        if self.is_seq2seq:
            encoder_outputs = self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
            start = self.model.config.decoder_start_token_id
            cur = torch.full((n, 1), pad if start is None else start, dtype=torch.long, device=input_ids.device)
            step_kwargs = {"encoder_outputs": encoder_outputs, "attention_mask": attention_mask}
        else:
            cur = input_ids
            position = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
            step_kwargs = {}
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model  # peft
        cache_key = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        past = None
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        out, scores = [], []
        for _ in range(max_new_tokens):
            if self.is_seq2seq:
                res = self.model(decoder_input_ids=cur, use_cache=True, **{cache_key: past}, **step_kwargs)
            else:
                res = self.model(input_ids=cur, attention_mask=mask, position_ids=position, use_cache=True,
                                 logits_to_keep=1, **{cache_key: past})
            past = res.get(cache_key)  # transformers >= 5.2x names the KV cache ``cache``, before ``past_key_values``
            logp = torch.log_softmax(res.logits[:, -1].float(), dim=-1).view(b, k, -1)
            marginal = torch.logsumexp(logp + doc_lp, dim=1)  # (B, V)
            if output_scores:
                scores.append(marginal)
            token = marginal.argmax(-1)
            token = token.masked_fill(done, pad)
            out.append(token)
            if eos_token_id is not None:
                done |= token == eos_token_id
            if bool(done.all()) and not synced_gpus:
                break
            cur = token.repeat_interleave(k).unsqueeze(-1)
            if not self.is_seq2seq:
                mask = torch.cat([mask, mask.new_ones((n, 1))], dim=1)
                position = position[:, -1:] + 1
        tokens = torch.stack(out, dim=1) if out else input_ids.new_zeros((b, 0))
        return (tokens, torch.stack(scores, dim=1) if scores else None) if output_scores else tokens

