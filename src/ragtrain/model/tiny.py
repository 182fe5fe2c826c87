"""Tiny randomly initialised models with locally trained tokenizers (tests, CPU demo).

``tiny:<family>`` in a recipe (``tiny:bert``, ``tiny:llama``, ``tiny:bart``, ``tiny:t5``) builds a model of a
few layers and hidden size <= 64 from a config, and a WordPiece tokenizer trained in well under a second on the
knowledge-base text.  Nothing is downloaded.  Built models export with ``save_pretrained`` like any other and
reload with plain transformers.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, decoders
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

FAMILIES = ("bert", "llama", "bart", "t5")
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"]


def train_word_tokenizer(texts: Iterable[str], vocab_size: int = 2000) -> Tokenizer:
    """A lowercase WordPiece tokenizer built from ``texts`` (deterministic for the same texts).

    The vocabulary is the special tokens, every character seen (alone and as a ``##`` continuation), then whole
    words by descending frequency (ties alphabetical) up to ``vocab_size``; longer unknown words fall back to
    characters.  It is built here rather than with ``trainers.WordPieceTrainer``, whose BPE merges break count
    ties in hash-map order and so give a different vocabulary from run to run (huggingface/tokenizers#1794):
    every process of a multi-process run builds its own tokenizer and they must agree.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in counts for c in w})
    vocab: dict[str, int] = {}
    for token in [*SPECIALS, *chars, *("##" + c for c in chars)]:
        vocab.setdefault(token, len(vocab))
    for word in sorted(counts, key=lambda w: (-counts[w], w)):
        if len(vocab) >= vocab_size:
            break
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    return tok


def encoder_tokenizer(base: Tokenizer) -> PreTrainedTokenizerFast:
    """BERT-style wrapper: ``[CLS] a [SEP] b [SEP]``."""
    tok = Tokenizer.from_str(base.to_str())
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)


def generator_tokenizer(base: Tokenizer, family: str) -> PreTrainedTokenizerFast:
    """Generator wrapper: ``<s> text`` for causal LMs (the collator appends ``</s>``), ``<s> text </s>``
    for BART and ``text </s>`` for T5, as the real tokenizers of those families do."""
    tok = Tokenizer.from_str(base.to_str())
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    single = {"llama": "<s> $A", "bart": "<s> $A </s>", "t5": "$A </s>"}[family]
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", bos), ("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                   eos_token="</s>", model_max_length=1024)


def build_tiny_model(family: str, tokenizer: PreTrainedTokenizerFast, hidden: int = 64, layers: int = 2,
                     seed: int = 0) -> torch.nn.Module:
    """A randomly initialised model of ``family`` sized to the tokenizer's vocabulary."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny model family {family!r} (choose from {', '.join(FAMILIES)})")
    vocab = len(tokenizer)
    pad, bos, eos = tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    heads = 2 if hidden % 2 == 0 else 1
    torch.manual_seed(seed)
    if family == "bert":
        cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         intermediate_size=2 * hidden, max_position_embeddings=512, pad_token_id=pad)
        return BertModel(cfg)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                          max_position_embeddings=1024, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos,
                          tie_word_embeddings=True)
        return LlamaForCausalLM(cfg)
    if family == "bart":
        cfg = BartConfig(vocab_size=vocab, d_model=hidden, encoder_layers=layers, decoder_layers=layers,
                         encoder_attention_heads=heads, decoder_attention_heads=heads,
                         encoder_ffn_dim=2 * hidden, decoder_ffn_dim=2 * hidden, max_position_embeddings=1024,
                         pad_token_id=pad, bos_token_id=bos, eos_token_id=eos, decoder_start_token_id=eos,
                         forced_eos_token_id=eos)
        return BartForConditionalGeneration(cfg)
    cfg = T5Config(vocab_size=vocab, d_model=hidden, d_kv=max(hidden // heads, 8), d_ff=2 * hidden,
                   num_layers=layers, num_heads=heads, pad_token_id=pad, eos_token_id=eos,
                   decoder_start_token_id=pad)
    return T5ForConditionalGeneration(cfg)
