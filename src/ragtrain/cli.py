"""``ragtrain`` command line: ``kb`` (ingest), ``index`` (encode + build), ``train``, ``eval``, ``ask``, ``config``,
``plot``.

    ragtrain kb data/kb.csv data/more.jsonl --out kb_dir --passage-words 100 [--passage-stride 50]
    ragtrain index --checkpoint runs/x/final --kb kb_dir --out index_dir
    ragtrain train --config launch/recipes/tiny-cpu.yaml output_dir=runs/x     (--help lists every config key)
    ragtrain eval --checkpoint runs/x/final --data qa.jsonl [--kb kb_dir] [--n-docs 5]
    ragtrain ask --checkpoint runs/x/final "a question"  (or questions on stdin, one per line) [--json] [--top 3]
    ragtrain config --recipe launch/recipes/tiny-cpu.yaml [key=value ...]      (prints the resolved config)
    ragtrain plot runs/x                                                       (writes runs/x/curves.png)

Bad input exits with status 2 and a one-line ``error: ...`` naming the file, row or key.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _cmd_kb(args) -> dict:
    from ragtrain.data.kb import build_kb

    if not 0 <= args.passage_stride <= args.passage_words:
        raise ValueError(f"--passage-stride: must be between 0 (= --passage-words) and --passage-words "
                         f"({args.passage_words}), got {args.passage_stride}")
    ds, stats = build_kb(args.sources, args.out, passage_words=args.passage_words,
                         skip_bad_rows=args.skip_bad_rows, return_stats=True, passage_stride=args.passage_stride,
                         max_passage_chars=args.max_passage_chars, duplicate_ids=args.duplicate_ids)
    return {"out": args.out, "passages": len(ds), "documents": stats["documents"], "skipped": stats["skipped"],
            "duplicate_ids": stats["duplicate_ids"]}


def _load_checkpoint(path: Path):
    from ragtrain.data.collate import RagCollator
    from ragtrain.model.loading import load_exported

    if not (path / "ragtrain.json").is_file():
        raise FileNotFoundError(f"{path}: not an exported ragtrain checkpoint (no ragtrain.json)")
    rag, toks, meta = load_exported(path)
    collator = RagCollator(toks.question, toks.context, toks.generator, is_seq2seq=meta["is_seq2seq"],
                           **{k: meta[k] for k in ("max_query_length", "max_passage_length", "max_prompt_length",
                                                  "max_answer_length", "chat_template", "stop_strings") if k in meta})
    return rag, collator, meta


def _cmd_index(args) -> dict:
    from ragtrain.data.kb import load_kb
    from ragtrain.eval.exported import encode_kb, resolve_device
    from ragtrain.index.faiss_index import DenseIndex
    from ragtrain.index.refresh import IndexStore
    from ragtrain.model.loading import load_exported_encoder

    ckpt = Path(args.checkpoint)
    if not (ckpt / "ragtrain.json").is_file():
        raise FileNotFoundError(f"{ckpt}: not an exported ragtrain checkpoint (no ragtrain.json)")
    _writable_dir("--out", Path(args.out))
    device = resolve_device(args.device)
    kb = load_kb(args.kb)  # before the encoder: a wrong --kb is said at once
    encoder, tokenizer, meta = load_exported_encoder(ckpt, "context_encoder")  # the generator is not needed
    emb = encode_kb(encoder, tokenizer, kb, meta.get("max_passage_length", 512), args.batch_size, device)
    index = DenseIndex.build(emb, kind=args.kind)
    version = IndexStore(Path(args.out)).publish(index, emb, step=0, extra={"kb": str(args.kb)})
    return {"out": args.out, "version": version, "ntotal": index.ntotal, "dim": index.dim}


def _writable_dir(option: str, path: Path) -> None:
    """``path`` is (or can be created as) a writable folder; else a ValueError naming ``option``."""
    p = path
    while not p.exists() and p.parent != p:
        p = p.parent
    if not p.is_dir():
        raise ValueError(f"{option} {path}: {p} is a file, not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: {p} is not writable")


# options that must be >= 1 (or >= 0), per command; None (not given: the run's own setting) is fine
_AT_LEAST = {"kb": {"passage_words": 1, "max_passage_chars": 0, "passage_stride": 0},
             "index": {"batch_size": 1},
             "eval": {"n_docs": 1, "num_beams": 1, "max_new_tokens": 1, "batch_size": 1, "max_examples": 0},
             "ask": {"top": 1, "n_docs": 1, "num_beams": 1, "max_new_tokens": 1}}


def _check_options(args) -> None:
    for name, low in _AT_LEAST.get(args.command, {}).items():
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')}: must be >= {low}, got {value}")


def _recall_ks(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        ks = [int(k) for k in text.split(",")]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        raise ValueError(f"--recall-ks: expected comma-separated integers >= 1, got {text!r}")
    return ks


def _cmd_eval(args) -> dict:
    from ragtrain.data.kb import load_kb
    from ragtrain.data.qa import load_qa
    from ragtrain.eval import exported as X
    from ragtrain.eval.evaluate import predict, summarize
    from ragtrain.index.faiss_index import DenseIndex

    ckpt = Path(args.checkpoint)
    if args.predictions:  # found out before the evaluation, not after it
        parent = Path(args.predictions).resolve().parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise ValueError(f"--predictions {args.predictions}: {parent} is not a writable folder")
    device = X.resolve_device(args.device)
    overrides = {"n_docs": args.n_docs, "num_beams": args.num_beams, "max_new_tokens": args.max_new_tokens,
                 "decoding": args.decoding, "batch_size": args.batch_size, "recall_ks": _recall_ks(args.recall_ks)}
    if not (ckpt / "ragtrain.json").is_file():
        raise FileNotFoundError(f"{ckpt}: not an exported ragtrain checkpoint (no ragtrain.json)")
    # every input and option checked before the models load
    meta = json.loads((ckpt / "ragtrain.json").read_text())
    settings = X.eval_settings(meta, overrides)
    kb_dir = X.kb_dir_of(ckpt, meta, args.kb)
    kb = load_kb(kb_dir)
    if settings["n_docs"] > len(kb):
        raise ValueError(f"--n-docs {settings['n_docs']}: larger than the knowledge base ({len(kb)} passages)")
    examples = load_qa(args.data, kb=kb)
    rag, collator, _ = _load_checkpoint(ckpt)
    rag.to(device)
    index, emb = X.load_index(ckpt, args.index) if (args.index or not args.kb) else (None, None)
    if index is None:
        print(f"ragtrain eval: no index for {kb_dir} in {ckpt}; encoding the KB with the exported context encoder",
              file=sys.stderr)
        emb = X.encode_kb(rag.context_encoder, collator.c_tok, kb, collator.max_passage_length,
                          settings["batch_size"], device)
        index = DenseIndex.build(emb)
    if index.ntotal != len(kb):
        raise ValueError(f"index has {index.ntotal} vectors but the KB {kb_dir} has {len(kb)} passages")
    if args.max_examples:
        examples = examples[: args.max_examples]
    ks = settings["recall_ks"]
    records = predict(rag, collator, X.make_search(X.retriever_kind(meta, args.retriever), index, emb, kb), kb,
                      examples, n_docs=settings["n_docs"],
                      recall_depth=min(max(ks), len(kb)), batch_size=settings["batch_size"],
                      num_beams=settings["num_beams"], max_new_tokens=settings["max_new_tokens"],
                      decoding=settings["decoding"], device=device)
    report = summarize(records, ks)
    if args.predictions:
        X.write_jsonl_atomic(Path(args.predictions), records)
    return report


def _cmd_ask(args) -> None:
    from ragtrain.ask import Asker, format_answer, read_questions

    questions = read_questions(args.questions, sys.stdin)
    asker = Asker(args.checkpoint, kb=args.kb or None, index=args.index or None, n_docs=args.n_docs,
                  decoding=args.decoding, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                  retriever=args.retriever, device=args.device)
    results = asker.ask(questions, top=args.top)
    for r in results:
        print(json.dumps(r) if args.json else format_answer(r) + "\n", flush=True)


def _cmd_config(args) -> None:
    import yaml

    from ragtrain.config import load_config

    cfg = load_config(args.recipe, args.overrides, check_files=not args.no_check_files)
    sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _cmd_plot(args) -> dict:
    from ragtrain.plot import plot_run

    return {"out": str(plot_run(args.run_dir, args.out or None))}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ragtrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    k = sub.add_parser("kb", help="ingest CSV/TSV/JSONL/SQuAD files into a passage dataset on disk")
    k.add_argument("sources", nargs="+")
    k.add_argument("--out", required=True)
    k.add_argument("--passage-words", type=int, default=100)
    k.add_argument("--passage-stride", type=int, default=0,
                   help="words between passage starts (< --passage-words: overlapping windows); 0 = --passage-words")
    k.add_argument("--skip-bad-rows", action="store_true")
    k.add_argument("--max-passage-chars", type=int, default=100_000,
                   help="a passage longer than this many characters is a bad row (0 = no limit)")
    k.add_argument("--duplicate-ids", default="error", choices=["error", "warn"],
                   help="a document id given to two documents: error, or warn (counted, both kept)")

    i = sub.add_parser("index", help="encode a KB with an exported context encoder and build a FAISS index")
    i.add_argument("--checkpoint", required=True, help="exported dir (OUTPUT_DIR/final)")
    i.add_argument("--kb", required=True)
    i.add_argument("--out", required=True)
    i.add_argument("--kind", default="flat", choices=["flat", "ivf", "ivfpq", "hnsw"])
    i.add_argument("--batch-size", type=int, default=64)
    i.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda, cuda:N")

    t = sub.add_parser("train", help="train (same as python train.py; --help lists every config key)",
                       add_help=False)
    t.add_argument("--config")
    t.add_argument("--deepspeed", default="")
    t.add_argument("overrides", nargs="*")

    e = sub.add_parser("eval", help="retrieve + generate over a QA file; prints one JSON object")
    e.add_argument("--checkpoint", required=True, help="exported dir (OUTPUT_DIR/final)")
    e.add_argument("--data", required=True, help="QA file (jsonl / squad json / .source)")
    e.add_argument("--kb", default="", help="KB dir (default: the one recorded in the checkpoint)")
    e.add_argument("--index", default="", help="index store dir (default: the checkpoint's index, or re-encode)")
    e.add_argument("--retriever", default=None, choices=["dense", "bm25", "hybrid"],
                   help="default: the retriever the run trained with (recorded in the export)")
    e.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda, cuda:N")
    # default None: the setting of the run's own evaluation (recorded in the export)
    e.add_argument("--n-docs", type=int, default=None, help="passages decoded from (default: the run's)")
    e.add_argument("--num-beams", type=int, default=None)
    e.add_argument("--decoding", default=None, choices=["auto", "fast", "thorough", "token"],
                   help="auto: RAG-Token decoding for a model trained with loss_type=token, else RAG-Sequence fast")
    e.add_argument("--max-new-tokens", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=None)
    e.add_argument("--max-examples", type=int, default=0)
    e.add_argument("--recall-ks", default=None, help="e.g. 1,5,20 (default: the run's)")
    e.add_argument("--predictions", default="", help="write per-question predictions (JSONL) here")

    a = sub.add_parser("ask", help="answer questions with an exported run: top passages with scores + the answer")
    a.add_argument("questions", nargs="*", help="question(s); none: read them from stdin, one per line")
    a.add_argument("--checkpoint", required=True, help="exported dir (OUTPUT_DIR/final)")
    a.add_argument("--top", type=int, default=3, help="passages shown per question")
    a.add_argument("--json", action="store_true", help="one JSON object per question")
    a.add_argument("--kb", default="", help="KB dir (default: the one recorded in the checkpoint)")
    a.add_argument("--index", default="", help="index store dir (default: the checkpoint's own index)")
    # default None: the run's own evaluation settings and retriever (recorded in the export)
    a.add_argument("--n-docs", type=int, default=None, help="passages the answer is decoded from")
    a.add_argument("--decoding", default=None, choices=["auto", "fast", "thorough", "token"])
    a.add_argument("--num-beams", type=int, default=None)
    a.add_argument("--max-new-tokens", type=int, default=None)
    a.add_argument("--retriever", default=None, choices=["dense", "bm25", "hybrid"])
    a.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda, cuda:N")

    c = sub.add_parser("config", help="print the fully resolved config (YAML) after validation")
    c.add_argument("--recipe", "--config", dest="recipe", default=None, help="YAML recipe (launch/recipes/*.yaml)")
    c.add_argument("--no-check-files", action="store_true", help="skip the checks that data/model paths exist")
    c.add_argument("overrides", nargs="*", help="key=value overrides")

    pl = sub.add_parser("plot", help="draw a run's loss and evaluation curves (index refreshes marked)")
    pl.add_argument("run_dir", help="a run's output_dir")
    pl.add_argument("--out", default="", help="image path (default RUN_DIR/curves.png)")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:  # train.py's own parser: the same options, and its --help lists every config key
        from ragtrain.train.run import main as train_main

        return train_main(argv[1:], prog="ragtrain train")
    args = build_parser().parse_args(argv)
    from ragtrain.config import ConfigError
    from ragtrain.data.errors import DataError

    commands = {"kb": _cmd_kb, "index": _cmd_index, "eval": _cmd_eval, "ask": _cmd_ask, "config": _cmd_config,
                "plot": _cmd_plot}
    try:
        _check_options(args)
        result = commands[args.command](args)
    except (ConfigError, DataError, OSError, ValueError) as e:  # OSError: unreadable/unwritable paths
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
