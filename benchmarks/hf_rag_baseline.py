"""Hugging Face's own end-to-end RAG training step, as a speed baseline for ragtrain.

This builds what a user of ``transformers`` gets from the ``rag-end2end-retriever`` research example, at a chosen
(tiny, random) size and fully offline:

* ``RagTokenForGeneration(question_encoder=DPRQuestionEncoder, generator=BartForConditionalGeneration,
  retriever=RagRetriever)``, with ``model.set_context_encoder_for_training(DPRContextEncoder)`` and
  ``retriever.set_ctx_encoder_tokenizer(...)`` so that the retrieved passages are re-encoded by the live context
  encoder inside ``forward`` and the doc scores carry gradient into it;
* a ``CustomHFIndex`` over a ``datasets.Dataset`` (title, text, embeddings) with a FAISS inner-product index
  (HNSW, M=128, as HF's ``use_own_knowledge_dataset.py`` / ``kb_encode_utils.py`` build it; ``"flat"`` on request);
* tokenizers trained locally on the passages (WordPiece for DPR, byte-level BPE for BART), no hub access.

One training step (:func:`hf_train_step`) is the example's ``GenerativeQAModule._step`` for a BART generator:
question ids from the question-encoder tokenizer, answer ids from the generator tokenizer, and
``model(input_ids, attention_mask, decoder_input_ids=target_ids, labels=target_ids, use_cache=False,
reduce_loss=True)``, then backward, optional grad-norm clipping, and the optimizer step.

Note: HF's retriever pads every passage+question generator input to ``max_combined_length`` (300 by default)
whatever their real length. That is what users get, so it is the default here; :func:`padding_share` reports how
much of the generator input is padding for a batch.

Usage::

    from benchmarks.hf_rag_baseline import TinySizes, build_hf_rag_e2e, hf_train_step, time_hf_steps
    setup = build_hf_rag_e2e(passages, None, TinySizes(hidden=64, layers=2), n_docs=5)
    opt = setup.make_optimizer()
    loss = hf_train_step(setup, ["who wrote hamlet?"], ["William Shakespeare"], opt)
    secs = time_hf_steps(setup, [(questions, answers), ...], warmup=1)
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

DPR_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# BART's own special-token order: <s>=0, <pad>=1, </s>=2, <unk>=3, <mask>=4.
BART_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


@dataclass
class TinySizes:
    """Sizes shared by the three random models.

    ``vocab=None`` gives each model exactly its tokenizer's vocabulary; an int pads both embedding tables up to
    that size (useful to match another system's vocabulary size in a speed comparison).
    """

    hidden: int = 64
    layers: int = 2
    heads: int = 2
    ffn: int = 128
    vocab: int | None = None
    max_positions: int = 512


@dataclass
class HFTokenizers:
    question: object  # DPRQuestionEncoderTokenizerFast
    context: object  # DPRContextEncoderTokenizerFast
    generator: object  # BartTokenizerFast (RobertaTokenizer in transformers 5)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        for name in ("question", "context", "generator"):
            getattr(self, name).save_pretrained(directory / name)
        return directory


def build_local_tokenizers(
    texts: Iterable[str],
    dpr_vocab_size: int = 8000,
    bart_vocab_size: int = 8000,
    model_max_length: int = 512,
    save_dir: str | os.PathLike | None = None,
) -> HFTokenizers:
    """Train a lower-cased WordPiece (DPR) and a byte-level BPE (BART) tokenizer on ``texts``; no hub access.

    They are loaded back with ``from_pretrained(<folder>)``: in transformers 5 the tokenizer constructors silently
    ignore ``vocab_file=`` / ``merges_file=`` and give a 5-token vocabulary, while ``from_pretrained`` on a folder
    with vocab.txt / vocab.json + merges.txt works in both 4.x and 5.x.
    """
    from tokenizers import BertWordPieceTokenizer, ByteLevelBPETokenizer
    from transformers import BartTokenizerFast, DPRContextEncoderTokenizerFast, DPRQuestionEncoderTokenizerFast

    texts = list(texts)
    tmp = tempfile.TemporaryDirectory(prefix="hf_rag_tok_")
    try:
        dpr_dir = Path(tmp.name) / "dpr"
        bart_dir = Path(tmp.name) / "bart"
        dpr_dir.mkdir()
        bart_dir.mkdir()

        wordpiece = BertWordPieceTokenizer(lowercase=True)
        wordpiece.train_from_iterator(
            texts, vocab_size=dpr_vocab_size, min_frequency=1, special_tokens=DPR_SPECIAL_TOKENS, show_progress=False
        )
        wordpiece.save_model(str(dpr_dir))

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(
            texts, vocab_size=bart_vocab_size, min_frequency=1, special_tokens=BART_SPECIAL_TOKENS, show_progress=False
        )
        bpe.save_model(str(bart_dir))

        kw = {"model_max_length": model_max_length}
        toks = HFTokenizers(
            question=DPRQuestionEncoderTokenizerFast.from_pretrained(str(dpr_dir), do_lower_case=True, **kw),
            context=DPRContextEncoderTokenizerFast.from_pretrained(str(dpr_dir), do_lower_case=True, **kw),
            generator=BartTokenizerFast.from_pretrained(str(bart_dir), **kw),
        )
    finally:
        tmp.cleanup()
    _check_tokenizers(toks)
    if save_dir is not None:
        toks.save_pretrained(save_dir)
    return toks


def load_tokenizers(directory: str | os.PathLike) -> HFTokenizers:
    """Load tokenizers saved by :meth:`HFTokenizers.save_pretrained` (folders question/, context/, generator/)."""
    from transformers import BartTokenizerFast, DPRContextEncoderTokenizerFast, DPRQuestionEncoderTokenizerFast

    directory = Path(directory)
    toks = HFTokenizers(
        question=DPRQuestionEncoderTokenizerFast.from_pretrained(str(directory / "question")),
        context=DPRContextEncoderTokenizerFast.from_pretrained(str(directory / "context")),
        generator=BartTokenizerFast.from_pretrained(str(directory / "generator")),
    )
    _check_tokenizers(toks)
    return toks


def _check_tokenizers(toks: HFTokenizers) -> None:
    for name in ("question", "context", "generator"):
        tok = getattr(toks, name)
        if len(tok) <= len(DPR_SPECIAL_TOKENS):
            raise ValueError(f"{name} tokenizer has only {len(tok)} tokens: its vocabulary did not load")
        if tok.pad_token_id is None:
            raise ValueError(f"{name} tokenizer has no pad token")
    for attr in ("cls_token_id", "sep_token_id"):
        if getattr(toks.question, attr) is None or getattr(toks.context, attr) is None:
            raise ValueError(f"DPR tokenizers need {attr}")
    if toks.generator.eos_token_id is None or toks.generator.bos_token_id is None:
        raise ValueError("the generator tokenizer needs <s> and </s>")


def _resolve_tokenizers(tokenizer_dir_or_objects, passages: Sequence[dict]) -> HFTokenizers:
    if tokenizer_dir_or_objects is None:
        return build_local_tokenizers(_passage_strings(passages))
    if isinstance(tokenizer_dir_or_objects, HFTokenizers):
        _check_tokenizers(tokenizer_dir_or_objects)
        return tokenizer_dir_or_objects
    if isinstance(tokenizer_dir_or_objects, (str, os.PathLike)):
        return load_tokenizers(tokenizer_dir_or_objects)
    if isinstance(tokenizer_dir_or_objects, dict):
        toks = HFTokenizers(**tokenizer_dir_or_objects)
    else:
        q, c, g = tokenizer_dir_or_objects  # (question, context, generator)
        toks = HFTokenizers(question=q, context=c, generator=g)
    _check_tokenizers(toks)
    return toks


def _passage_strings(passages: Sequence[dict]) -> list[str]:
    return [f"{p.get('title', '')} {p['text']}" for p in passages]


@dataclass
class HFRagSetup:
    model: object  # RagTokenForGeneration (holds question encoder, generator and, as rag.ctx_encoder, the ctx encoder)
    retriever: object  # RagRetriever
    tokenizers: HFTokenizers
    dataset: object  # datasets.Dataset with title, text, embeddings + faiss index "embeddings"
    config: object  # RagConfig
    sizes: TinySizes
    n_docs: int
    max_combined_length: int
    max_source_length: int = 128  # the example's defaults
    max_target_length: int = 25
    label_smoothing: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def question_encoder(self):
        return self.model.rag.question_encoder

    @property
    def ctx_encoder(self):
        return self.model.rag.ctx_encoder

    @property
    def generator(self):
        return self.model.rag.generator

    def make_optimizer(self, lr: float = 3e-5, weight_decay: float = 0.001, eps: float = 1e-8):
        """AdamW over all three models, with the example's no-decay groups (bias, LayerNorm.weight)."""
        no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "layernorm_embedding.weight")
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if not any(k in n for k in no_decay)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if any(k in n for k in no_decay)], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=lr, eps=eps)


@torch.no_grad()
def _embed_passages(ctx_encoder, ctx_tokenizer, passages: Sequence[dict], batch_size: int = 64):
    was_training = ctx_encoder.training
    ctx_encoder.eval()
    out = []
    for i in range(0, len(passages), batch_size):
        chunk = passages[i : i + batch_size]
        enc = ctx_tokenizer(
            [p.get("title", "") for p in chunk],
            [p["text"] for p in chunk],
            truncation=True,
            padding="longest",
            return_tensors="pt",
        )
        out.append(
            ctx_encoder(enc["input_ids"], attention_mask=enc["attention_mask"], return_dict=True).pooler_output
        )
    ctx_encoder.train(was_training)
    return torch.cat(out).float().numpy()


def build_hf_rag_e2e(
    passages: Sequence[dict],
    tokenizer_dir_or_objects=None,
    sizes: TinySizes | None = None,
    n_docs: int = 5,
    max_combined_length: int = 300,
    seed: int = 0,
    index_type: str = "hnsw",
    retrieval_batch_size: int = 8,
    label_smoothing: float = 0.0,
    dropout: float = 0.1,
    device: str | torch.device | None = None,
) -> HFRagSetup:
    """Build HF's end-to-end RAG (RAG-Token) with random DPR encoders and a random BART generator.

    ``passages``: dicts with ``text`` (and ``title``). ``tokenizer_dir_or_objects``: ``None`` (train tokenizers on
    the passages), a folder saved by :meth:`HFTokenizers.save_pretrained`, an :class:`HFTokenizers`, or a
    ``(question, context, generator)`` tuple / dict. The KB embeddings and FAISS index are built once with the
    initial context encoder (HF re-indexes only in separate processes every ``indexing_freq`` steps; a step here
    never re-indexes). ``device``: where the model lives for training (the KB is embedded on CPU before the move;
    the retriever always runs on CPU, as in HF). ``dropout``: every dropout rate of the three models (DPR hidden
    and attention-probability dropout, BART dropout and attention dropout; 0.1 is both libraries' default).
    """
    import datasets
    import faiss
    from transformers import (
        BartConfig,
        BartForConditionalGeneration,
        DPRConfig,
        DPRContextEncoder,
        DPRQuestionEncoder,
        RagConfig,
        RagRetriever,
        RagTokenForGeneration,
    )
    from transformers.models.rag.retrieval_rag import CustomHFIndex

    if len(passages) < n_docs:
        raise ValueError(f"need at least n_docs={n_docs} passages, got {len(passages)}")
    if index_type not in ("hnsw", "flat"):
        raise ValueError(f"index_type must be 'hnsw' or 'flat', got {index_type!r}")
    sizes = sizes or TinySizes()
    toks = _resolve_tokenizers(tokenizer_dir_or_objects, passages)
    # RagRetriever tokenizes passages for the context encoder with truncation=True and no max_length, i.e. at the
    # tokenizer's model_max_length; more than the encoder's position table would crash the forward.
    for tok in (toks.question, toks.context):
        if tok.model_max_length is None or tok.model_max_length > sizes.max_positions:
            tok.model_max_length = sizes.max_positions

    def vocab_for(tok) -> int:
        n = len(tok)
        if sizes.vocab is not None and sizes.vocab < n:
            raise ValueError(f"TinySizes.vocab={sizes.vocab} is smaller than a tokenizer's vocabulary ({n})")
        return sizes.vocab or n

    dpr_vocab = max(vocab_for(toks.question), vocab_for(toks.context))
    dpr_config = DPRConfig(
        vocab_size=dpr_vocab,
        hidden_size=sizes.hidden,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        intermediate_size=sizes.ffn,
        max_position_embeddings=sizes.max_positions,
        pad_token_id=toks.question.pad_token_id,
        projection_dim=0,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    g = toks.generator
    bart_config = BartConfig(
        vocab_size=vocab_for(g),
        d_model=sizes.hidden,
        encoder_layers=sizes.layers,
        decoder_layers=sizes.layers,
        encoder_attention_heads=sizes.heads,
        decoder_attention_heads=sizes.heads,
        encoder_ffn_dim=sizes.ffn,
        decoder_ffn_dim=sizes.ffn,
        max_position_embeddings=max(sizes.max_positions, max_combined_length),
        pad_token_id=g.pad_token_id,
        bos_token_id=g.bos_token_id,
        eos_token_id=g.eos_token_id,
        decoder_start_token_id=g.eos_token_id,
        forced_eos_token_id=g.eos_token_id,
        dropout=dropout,
        attention_dropout=dropout,
    )

    torch.manual_seed(seed)
    question_encoder = DPRQuestionEncoder(dpr_config)
    ctx_encoder = DPRContextEncoder(dpr_config)
    generator = BartForConditionalGeneration(bart_config)

    rag_config = RagConfig.from_question_encoder_generator_configs(
        question_encoder.config,
        generator.config,
        n_docs=n_docs,
        max_combined_length=max_combined_length,
        retrieval_vector_size=sizes.hidden,
        retrieval_batch_size=retrieval_batch_size,
        index_name="custom",
        label_smoothing=label_smoothing,
    )

    embeddings = _embed_passages(ctx_encoder, toks.context, passages)
    dataset = datasets.Dataset.from_dict(
        {
            "title": [p.get("title", "") for p in passages],
            "text": [p["text"] for p in passages],
            "embeddings": [e.tolist() for e in embeddings],
        }
    )
    if index_type == "hnsw":
        faiss_index = faiss.IndexHNSWFlat(sizes.hidden, 128, faiss.METRIC_INNER_PRODUCT)
    else:
        faiss_index = faiss.IndexFlatIP(sizes.hidden)
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        dataset.add_faiss_index("embeddings", custom_index=faiss_index)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    index = CustomHFIndex(sizes.hidden, dataset)  # index_path=None -> already initialised

    retriever = RagRetriever(rag_config, toks.question, toks.generator, index=index)
    retriever.set_ctx_encoder_tokenizer(toks.context)

    model = RagTokenForGeneration(
        config=rag_config, question_encoder=question_encoder, generator=generator, retriever=retriever
    )
    model.set_context_encoder_for_training(ctx_encoder)
    if device is not None:
        model.to(device)
    model.train()

    # set_context_encoder_for_training assigns rag.ctx_encoder as a submodule, so it is in model.parameters().
    ids = {id(p) for p in model.parameters()}
    if not all(id(p) in ids for p in ctx_encoder.parameters()):
        raise RuntimeError("context encoder parameters are not part of the RAG model")

    return HFRagSetup(
        model=model,
        retriever=retriever,
        tokenizers=toks,
        dataset=dataset,
        config=rag_config,
        sizes=sizes,
        n_docs=n_docs,
        max_combined_length=max_combined_length,
        label_smoothing=label_smoothing,
    )


def _model_device(setup: HFRagSetup) -> torch.device:
    return next(setup.model.parameters()).device


def encode_batch(setup: HFRagSetup, questions: Sequence[str], answers: Sequence[str]) -> dict:
    """Tokenize as the example's Seq2SeqDataset + collate_fn: pad, then trim all-pad columns (= pad to longest).
    Tensors are put on the model's device."""
    src = setup.tokenizers.question(
        list(questions),
        max_length=setup.max_source_length,
        padding="longest",
        truncation=True,
        return_tensors="pt",
    )
    # The example passes add_prefix_space=True to BartTokenizer for lines not starting with a space; a leading
    # space is the same thing for a byte-level BPE without the kwarg.
    tgt = setup.tokenizers.generator(
        [a if a.startswith(" ") else " " + a for a in answers],
        max_length=setup.max_target_length,
        padding="longest",
        truncation=True,
        return_tensors="pt",
    )
    device = _model_device(setup)
    return {
        "input_ids": src["input_ids"].to(device),
        "attention_mask": src["attention_mask"].to(device),
        "decoder_input_ids": tgt["input_ids"].to(device),
    }


def hf_forward_backward(setup: HFRagSetup, questions: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
    """Forward + backward of one batch (GenerativeQAModule._step for a BART generator); returns the loss."""
    batch = encode_batch(setup, questions, answers)
    target_ids = batch["decoder_input_ids"]
    setup.model.train()
    outputs = setup.model(
        batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=target_ids,
        use_cache=False,
        labels=target_ids,
        reduce_loss=True,
    )
    loss = outputs["loss"]
    loss.backward()
    return loss.detach()


def hf_train_step(
    setup: HFRagSetup,
    questions: Sequence[str],
    answers: Sequence[str],
    optimizer: torch.optim.Optimizer,
    max_grad_norm: float | None = 0.1,
) -> float:
    """One HF e2e training step: zero grads, forward, backward, clip (example default 0.1), optimizer step.

    Gradients are zeroed at the start rather than the end, so they stay inspectable after the call.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = hf_forward_backward(setup, questions, answers)
    if max_grad_norm is not None and max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(setup.model.parameters(), max_grad_norm)
    optimizer.step()
    return float(loss)


def time_hf_steps(
    setup: HFRagSetup,
    batches: Sequence[tuple[Sequence[str], Sequence[str]]],
    warmup: int = 1,
    optimizer: torch.optim.Optimizer | None = None,
    max_grad_norm: float | None = 0.1,
) -> list[float]:
    """Wall seconds of :func:`hf_train_step` for each ``(questions, answers)`` batch.

    ``warmup`` untimed steps run first on the leading batches (cycled); then every batch is timed, so the result
    has ``len(batches)`` entries. An AdamW from :meth:`HFRagSetup.make_optimizer` is used when none is given.
    """
    if not batches:
        return []
    optimizer = optimizer or setup.make_optimizer()
    for i in range(warmup):
        q, a = batches[i % len(batches)]
        hf_train_step(setup, q, a, optimizer, max_grad_norm)
    sync = torch.cuda.synchronize if _model_device(setup).type == "cuda" else (lambda: None)
    times = []
    for q, a in batches:
        sync()
        t0 = time.perf_counter()
        hf_train_step(setup, q, a, optimizer, max_grad_norm)
        sync()  # float(loss) already syncs; this also covers the optimizer step
        times.append(time.perf_counter() - t0)
    return times


@torch.no_grad()
def retrieve(setup: HFRagSetup, questions: Sequence[str]):
    """Run the question encoder + RagRetriever as the model's forward does; returns the retriever's BatchEncoding
    (context_input_ids, context_attention_mask, retrieved_doc_embeds, doc_ids, tokenized_doc_ids, ...)."""
    src = setup.tokenizers.question(
        list(questions), max_length=setup.max_source_length, padding="longest", truncation=True, return_tensors="pt"
    )
    was_training = setup.model.training
    setup.model.eval()
    device = _model_device(setup)
    q = setup.question_encoder(
        src["input_ids"].to(device), attention_mask=src["attention_mask"].to(device), return_dict=True
    )[0]
    setup.model.train(was_training)
    return setup.retriever(
        src["input_ids"],
        q.detach().to(device="cpu", dtype=torch.float32).numpy(),
        prefix=getattr(setup.generator.config, "prefix", None),
        n_docs=setup.n_docs,
        return_tensors="pt",
    )


def padding_share(setup: HFRagSetup, questions: Sequence[str]) -> float:
    """Fraction of the generator's (passage + question) input tokens that are padding for this batch."""
    out = retrieve(setup, questions)
    mask = out["context_attention_mask"]
    return 1.0 - float(mask.sum()) / mask.numel()


def squad_passages_and_qa(path: str | os.PathLike, words_per_passage: int = 100):
    """SQuAD-format JSON(.gz) -> (passages split into ``words_per_passage``-word chunks with the article title,
    [(question, first answer)]). Only for driving this baseline; ragtrain's own loaders live in ragtrain.data."""
    import gzip
    import json

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        data = json.load(f)["data"]
    passages, qa = [], []
    for article in data:
        title = article.get("title", "").replace("_", " ")
        for para in article["paragraphs"]:
            words = para["context"].split()
            for i in range(0, len(words), words_per_passage):
                passages.append({"title": title, "text": " ".join(words[i : i + words_per_passage])})
            for q in para["qas"]:
                if q.get("answers"):
                    qa.append((q["question"], q["answers"][0]["text"]))
    return passages, qa


def main(argv: Sequence[str] | None = None) -> None:
    import argparse
    import json
    import statistics

    ap = argparse.ArgumentParser(description="Time Hugging Face's end-to-end RAG training step on CPU/GPU.")
    ap.add_argument("--squad", default=str(Path(__file__).resolve().parents[1] / "../shared/data/squad-v1.1-dev.json.gz"))
    ap.add_argument("--passages", type=int, default=0, help="use the first N passages (0 = all)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--ffn", type=int, default=128)
    ap.add_argument("--n-docs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--max-combined-length", type=int, default=300)
    ap.add_argument("--index", choices=["hnsw", "flat"], default="hnsw")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave as is)")
    ap.add_argument("--device", default=None, help="e.g. cuda; default CPU")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    passages, qa = squad_passages_and_qa(args.squad)
    if args.passages:
        passages = passages[: args.passages]
    t0 = time.perf_counter()
    setup = build_hf_rag_e2e(
        passages,
        None,
        TinySizes(hidden=args.hidden, layers=args.layers, heads=args.heads, ffn=args.ffn),
        n_docs=args.n_docs,
        max_combined_length=args.max_combined_length,
        index_type=args.index,
        device=args.device,
    )
    build_s = time.perf_counter() - t0
    batches = [
        ([q for q, _ in qa[i : i + args.batch]], [a for _, a in qa[i : i + args.batch]])
        for i in range(0, args.batch * args.steps, args.batch)
    ]
    pad = padding_share(setup, batches[0][0])
    times = time_hf_steps(setup, batches, warmup=args.warmup)
    print(
        json.dumps(
            {
                "kb_passages": len(passages),
                "dpr_vocab": len(setup.tokenizers.question),
                "bart_vocab": len(setup.tokenizers.generator),
                "build_s": round(build_s, 2),
                "step_s": [round(t, 4) for t in times],
                "median_step_s": round(statistics.median(times), 4),
                "padding_share": round(pad, 3),
                "torch_threads": torch.get_num_threads(),
                **{k: v for k, v in vars(args).items() if k not in ("squad", "passages")},
            },
            indent=1,
        )
    )


__all__ = [
    "squad_passages_and_qa",
    "TinySizes",
    "HFTokenizers",
    "HFRagSetup",
    "build_local_tokenizers",
    "load_tokenizers",
    "build_hf_rag_e2e",
    "encode_batch",
    "hf_forward_backward",
    "hf_train_step",
    "time_hf_steps",
    "retrieve",
    "padding_share",
]


if __name__ == "__main__":
    main()
