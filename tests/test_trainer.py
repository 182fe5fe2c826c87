"""End-to-end tiny runs of the trainer: refresh, frozen/trained encoders, resume, export, eval CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, tiny_overrides
from ragtrain.train.trainer import Trainer


def _ctx_params(trainer):
    return {k: v.detach().clone() for k, v in trainer.unwrapped.context_encoder.named_parameters()}


def test_end2end_refresh_changes_embeddings_and_bumps_version(tiny_cfg):
    tr = Trainer(tiny_cfg(**{"rag.mode": "end2end", "index.refresh_every": 3, "train.max_steps": 3}))
    assert tr.index_version == 1
    before_emb = np.array(tr.store.load_current()[1])
    before = _ctx_params(tr)
    tr.train()
    assert tr.index_version == 2 and tr.last_refresh_step == 3
    after_emb = np.array(tr.store.load_current()[1])
    assert after_emb.shape == before_emb.shape
    assert not np.allclose(after_emb, before_emb), "refresh must re-encode with the trained context encoder"
    changed = [k for k, v in _ctx_params(tr).items() if not torch.equal(v, before[k])]
    assert changed, "end2end must update the context encoder"
    # the new index returns the same vectors the live encoder produces now
    fresh = tr.encode_kb()
    np.testing.assert_allclose(fresh, after_emb, atol=1e-5)
    # and the live retriever searches it: top-5 of random queries = brute force over the new vectors, not the old
    q = torch.randn(6, after_emb.shape[1], generator=torch.Generator().manual_seed(0))
    res = tr.search(q, [f"q{i}" for i in range(6)], 5)
    top = lambda emb: np.argsort(-(q.numpy() @ emb.T), axis=1, kind="stable")[:, :5]  # noqa: E731
    assert not np.array_equal(top(after_emb), top(before_emb))  # the two indexes answer differently here
    np.testing.assert_array_equal(res["ids"].numpy(), top(after_emb))
    np.testing.assert_allclose(res["scores"].numpy(), np.take_along_axis(q.numpy() @ after_emb.T, top(after_emb), 1),
                               rtol=1e-5, atol=1e-5)


def test_encode_kb_equals_unpadded_per_passage_encoding(tiny_cfg):
    """Length-sorted, cached-token batches put every vector back in KB order, equal to encoding each passage
    alone (no padding at all); the second refresh reuses the tokens."""
    tr = Trainer(tiny_cfg(**{"index.encode_batch_size": 5}))
    emb = tr.encode_kb()
    cache = tr._kb_tokens_cache
    assert len(cache) == len(tr.kb) and len(set(cache.lengths.tolist())) > 1, "needs passages of mixed length"
    enc = tr.unwrapped.context_encoder.eval()
    with torch.no_grad():
        for i in range(len(tr.kb)):
            one = tr.collator.passages([(tr.kb[i]["title"], tr.kb[i]["text"])])
            ref = enc(one["input_ids"], one["attention_mask"])[0].numpy()
            np.testing.assert_allclose(emb[i], ref, atol=1e-5, err_msg=f"passage {i}")
    tr.encode_kb()
    assert tr._kb_tokens_cache is cache


def _unpadded(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    return [r[m.bool()].tolist() for r, m in zip(input_ids, attention_mask)]


def test_live_retrieval_encodes_unique_passages_from_the_token_cache(tiny_cfg, monkeypatch):
    """end2end retrieve: one context-encoder row per unique retrieved passage, ``ctx_index`` mapping every
    (question, passage) slot to the row holding that passage's ids, read from the KB token cache (no tokenizer
    call) where the cache holds the row and tokenized otherwise."""
    tr = Trainer(tiny_cfg(**{"rag.mode": "end2end", "rag.n_docs": 3, "train.batch_size": 6,
                             "rag.retrieval_loss_weight": 0.5}))
    assert tr._kb_tokens_cache is not None, "the initial index build fills the token cache"
    batch = tr._collate(tr.splits["train"][:6])
    q = tr.unwrapped.encode_questions(batch["q_input_ids"], batch["q_attention_mask"])
    calls = []
    tokenize = tr.collator.passage_ids
    monkeypatch.setattr(tr.collator, "passage_ids", lambda t, x: calls.append(len(t)) or tokenize(t, x))
    docs = tr._make_retrieve(batch)(q.detach(), True, True)
    assert calls == [], "every passage comes from the token cache"
    ids = docs["doc_ids"].reshape(-1).tolist()
    assert docs["ctx_input_ids"].shape[0] == len(set(ids)) < len(ids), "needs a passage retrieved twice"
    rows = _unpadded(docs["ctx_input_ids"], docs["ctx_attention_mask"])
    want = _unpadded(**tr.collator.passages([(tr.kb[i]["title"], tr.kb[i]["text"]) for i in ids]))
    assert [rows[j] for j in docs["ctx_index"].tolist()] == want
    gold = batch["gold_ids"].clamp(min=0).tolist()
    assert _unpadded(docs["gold_input_ids"], docs["gold_attention_mask"]) == _unpadded(
        **tr.collator.passages([(tr.kb[i]["title"], tr.kb[i]["text"]) for i in gold]))
    # a cache holding only part of the KB (another rank's slice): the rows it lacks are tokenized, same ids
    from ragtrain.data.kb_tokens import PassageTokens
    half = range(0, len(tr.kb) // 2)
    tr._kb_tokens_cache = PassageTokens(tr.kb, half, tokenize, tr.collator.pad_passage_ids)
    some = sorted(set(ids) | {0, len(tr.kb) - 1})
    calls.clear()
    got = tr._passage_inputs(some)
    assert calls == [sum(i not in half for i in some)]
    assert _unpadded(got["input_ids"], got["attention_mask"]) == _unpadded(
        **tr.collator.passages([(tr.kb[i]["title"], tr.kb[i]["text"]) for i in some]))


def test_optimizer_is_fused_adamw_on_cpu(tiny_cfg):
    tr = Trainer(tiny_cfg())
    inner = getattr(tr.optimizer, "optimizer", tr.optimizer)
    assert isinstance(inner, torch.optim.AdamW) and inner.defaults["fused"] is True


def test_original_mode_keeps_context_encoder_and_index(tiny_cfg):
    tr = Trainer(tiny_cfg(**{"rag.mode": "original", "train.max_steps": 3}))
    before = _ctx_params(tr)
    q_before = {k: v.detach().clone() for k, v in tr.unwrapped.question_encoder.named_parameters()}
    tr.train()
    assert all(torch.equal(v, before[k]) for k, v in _ctx_params(tr).items())
    assert any(not torch.equal(v, q_before[k]) for k, v in tr.unwrapped.question_encoder.named_parameters())
    assert tr.index_version == 1
    names = {g["name"] for g in tr.optimizer.param_groups}
    assert names == {"generator", "question_encoder"}


def test_full_run_writes_metrics_and_reloadable_exports(tiny_cfg, tmp_path):
    cfg = tiny_cfg(**{"index.refresh_every": 2, "train.eval_every": 2, "train.max_steps": 4})
    result = Trainer(cfg).train()
    out = tmp_path / "run"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        for key in ("step", "loss", "em", "f1", "recall@1", "recall@5", "mrr"):
            assert key in r, key
    assert result["index_version"] == 3  # initial build + refreshes at steps 2 and 4
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert list((out / "tensorboard").rglob("events.out.tfevents.*")), "TensorBoard logs missing"
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    for name in ("question_encoder", "context_encoder"):
        m = AutoModel.from_pretrained(out / "final" / name)
        AutoTokenizer.from_pretrained(out / "final" / name)
        assert m.config.hidden_size == 32
    g = AutoModelForCausalLM.from_pretrained(out / "final" / "generator")
    # exported weights equal the trained ones
    assert (out / "final" / "index" / "index.faiss").is_file()
    assert g.config.num_hidden_layers == 1

    # `ragtrain eval` on the export prints one JSON object with the metrics
    proc = subprocess.run([sys.executable, "-m", "ragtrain.cli", "eval", "--checkpoint", str(out / "final"),
                           "--data", str(ROOT / "src/ragtrain/sample/qa.jsonl"), "--max-examples", "6",
                           "--max-new-tokens", "3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("em", "f1", "recall@1", "recall@5", "mrr"):
        assert key in report
    assert report["n"] == 6


def test_export_matches_trained_weights(tiny_cfg, tmp_path):
    tr = Trainer(tiny_cfg(**{"train.max_steps": 2}))
    tr.train()
    from transformers import AutoModel

    q = AutoModel.from_pretrained(tmp_path / "run" / "final" / "question_encoder")
    live = tr.unwrapped.question_encoder.model.state_dict()
    for k, v in q.state_dict().items():
        torch.testing.assert_close(v, live[k])


def test_resume_reproduces_the_uninterrupted_run(tiny_cfg, tmp_path, monkeypatch):
    common = {"rag.mode": "end2end", "index.refresh_every": 2, "train.max_steps": 4, "train.save_every": 2}
    Trainer(tiny_cfg("straight", **common)).train()
    straight = [json.loads(x)["loss"] for x in (tmp_path / "straight/train_log.jsonl").read_text().splitlines()]

    class Crash(Exception):
        pass

    original_save = Trainer.save_checkpoint

    def save_then_crash(self):
        original_save(self)
        raise Crash  # the job dies right after its step-2 checkpoint

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        Trainer(tiny_cfg("resumed", **common)).train()
    monkeypatch.setattr(Trainer, "save_checkpoint", original_save)
    assert (tmp_path / "resumed/checkpoints/latest").read_text().strip() == "step_00000002"
    tr = Trainer(tiny_cfg("resumed", **{**common, "resume": "true"}))
    assert tr.step == 2 and tr.index_version == 2
    tr.train()
    resumed = [json.loads(x)["loss"] for x in (tmp_path / "resumed/train_log.jsonl").read_text().splitlines()]
    assert len(resumed) == 4
    np.testing.assert_allclose(resumed, straight, rtol=1e-5)


@pytest.mark.parametrize("loss_type", ["sequence", "token"])
def test_seq2seq_generator_trains(tiny_cfg, loss_type):
    tr = Trainer(tiny_cfg(**{"model.generator": "tiny:bart", "rag.loss_type": loss_type, "train.max_steps": 2,
                             "rag.retrieval_loss_weight": 0.5}))
    assert tr.rag.generator.is_seq2seq
    res = tr.train()
    assert np.isfinite(res["loss"])


def test_bm25_retriever_in_original_mode(tiny_cfg):
    tr = Trainer(tiny_cfg(**{"rag.mode": "original", "index.retriever": "bm25", "train.max_steps": 1}))
    q = torch.zeros((1, tr.unwrapped.question_encoder.dim))
    res = tr.search(q, ["Which river flows through the town?"], 3)
    assert res["ids"].shape == (1, 3)
    tr.train()


def test_train_cli_rejects_bad_config_without_writing(tmp_path):
    out = tmp_path / "never"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *tiny_overrides(out), "rag.n_docs=0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "rag.n_docs" in err[0]
    assert not out.exists()


def test_n_docs_larger_than_kb_is_rejected_before_models_load(tmp_path, monkeypatch):
    from ragtrain.config import ConfigError, load_config
    import ragtrain.train.trainer as T

    def boom(*a, **k):
        raise AssertionError("models must not load")

    monkeypatch.setattr(T, "build_rag_model", boom)
    with pytest.raises(ConfigError, match="rag.n_docs"):
        T.Trainer(load_config(None, tiny_overrides(tmp_path / "x", **{"rag.n_docs": 10_000})))


def test_lora_on_generator_and_encoders(tiny_cfg, tmp_path):
    tr = Trainer(tiny_cfg(**{"model.lora": "generator,question_encoder,context_encoder", "model.lora_r": 4,
                             "train.max_steps": 2, "index.refresh_every": 2}))
    gen = tr.unwrapped.generator.model
    trainable = {n for n, p in gen.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in gen.named_parameters() if "lora_B" in n}
    base_before = {n: p.detach().clone() for n, p in gen.named_parameters() if "lora_" not in n}
    tr.train()
    after = dict(gen.named_parameters())
    assert any(not torch.equal(after[n], v) for n, v in before.items()), "LoRA adapters did not train"
    assert all(torch.equal(after[n], v) for n, v in base_before.items()), "base weights must stay frozen"
    out = tmp_path / "run" / "final"
    assert (out / "generator_lora_adapter" / "adapter_config.json").is_file()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "generator")
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_evaluation_generates_for_the_first_n_and_retrieves_for_all(tiny_cfg, monkeypatch):
    tr = Trainer(tiny_cfg(**{"eval.max_generate": 3, "eval.max_generate_in_training": 0, "eval.decode_docs": 2,
                             "eval.batch_size": 2, "data.max_eval_examples": 0}))
    examples = tr.splits["test"]
    assert len(examples) > 3
    rows_per_call = []
    inner = tr.unwrapped.generator.generate

    def counting(ids, *a, **kw):
        rows_per_call.append(ids.shape[0])
        return inner(ids, *a, **kw)

    monkeypatch.setattr(tr.unwrapped.generator, "generate", counting)
    full, full_records = tr.evaluate(examples, -1)
    n_calls_all = len(rows_per_call)
    rows_per_call.clear()
    final = tr.evaluate_and_log("test", final=True)
    # 3 questions generated, in 2 batches of <= 2 questions x decode_docs=2 candidates
    assert rows_per_call == [4, 2] and n_calls_all == -(-len(examples) // 2)
    assert final["n"] == len(examples) and final["n_generated"] == 3
    records = [json.loads(x) for x in (tr.out / "predictions_test.jsonl").read_text().splitlines()]
    assert [r["prediction"] is not None for r in records] == [True] * 3 + [False] * (len(examples) - 3)
    # retrieval metrics cover every question and do not depend on how many were generated
    for k in ("recall@1", "recall@5", "mrr"):
        assert final[k] == pytest.approx(full[k])
    assert [r["hits"] for r in records] == [r["hits"] for r in full_records]
    rows_per_call.clear()
    val = tr.evaluate_and_log("validation")  # in-training evaluations: retrieval only here
    assert rows_per_call == [] and val["n_generated"] == 0 and "em" not in val and "recall@5" in val


def test_eval_keys_are_validated(tiny_cfg):
    from ragtrain.config import ConfigError

    with pytest.raises(ConfigError, match="eval.decode_docs"):
        tiny_cfg(**{"eval.decode_docs": 4})  # rag.n_docs is 3
    with pytest.raises(ConfigError, match="eval.max_generate"):
        tiny_cfg(**{"eval.max_generate": -2})


def test_auto_precision_is_bf16_on_bf16_gpus_and_amx_cpus_else_fp32(monkeypatch):
    from ragtrain.train import trainer as T

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert T.resolve_mixed_precision("auto") == "bf16"  # benchmarks/results/precision-cpu backs it
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert T.resolve_mixed_precision("auto") == "no"
    assert T.resolve_mixed_precision("bf16") == "bf16" and T.resolve_mixed_precision("fp16") == "fp16"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert T.resolve_mixed_precision("auto") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert T.resolve_mixed_precision("auto") == "no"


def test_faiss_padding_is_masked_not_read_as_passage_0(tiny_cfg):
    """IVF with nprobe=1 and k larger than a probed list: FAISS pads with -1. Those slots get p(z|x) = 0, are never
    hits, and no passage enters the marginal twice."""
    # 80 passages -> nlist clipped to 2 (FAISS wants 39 points a centroid): lists of ~40 < k = 60
    tr = Trainer(tiny_cfg(**{"index.kind": "ivf", "index.nlist": 2, "index.nprobe": 1, "rag.n_docs": 60,
                             "rag.mode": "end2end", "rag.retrieval_loss_weight": 0.5, "train.batch_size": 4,
                             "eval.recall_ks": "1,60", "eval.batch_size": 4}))
    batch = next(iter(tr.train_loader))
    q = tr.unwrapped.encode_questions(batch["q_input_ids"], batch["q_attention_mask"])
    res = tr.search(q.detach(), batch["questions"], 60)
    ids = res["ids"]
    assert (ids < 0).any(), "the test needs padded slots (probed lists shorter than k)"
    for row in ids.tolist():
        real = [i for i in row if i >= 0]
        assert len(real) == len(set(real))  # padding is not turned into repeated passages
    assert torch.isinf(res["scores"][ids < 0]).all()
    out = tr.model(batch["q_input_ids"], batch["q_attention_mask"], retrieve=tr._make_retrieve(batch))
    pad = out.doc_ids < 0
    assert pad.any() and torch.isinf(out.doc_scores[pad]).all() and torch.isfinite(out.doc_scores[~pad]).all()
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for p in tr.unwrapped.context_encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # evaluation: a padding slot is never a hit, even where passage 0's text holds the answer
    metrics, records = tr.evaluate(tr.splits["test"], 0)
    assert any(i < 0 for r in records for i in r["retrieved_ids"])
    for r in records:
        assert not any(h for h, i in zip(r["hits"], r["retrieved_ids"]) if i < 0)
    # answer-string hits (no gold id): the padding slot's filler text holds the answer, yet it is no hit
    from ragtrain.eval.evaluate import _record

    ex = {"id": "x", "question": "q", "answers": ["blue lagoon"], "gold_passage_id": -1}
    rec = _record(ex, None, np.array([-1, 7]), [("", "the Blue Lagoon"), ("", "the Blue Lagoon too")])
    assert rec["hits"] == [False, True]


def test_rerank_keeps_the_live_encoders_top_k_of_the_stale_top_l(tiny_cfg):
    """rag.rerank_top=L: the k passages used are the best k of the index's top L under the *live* context
    encoder (trained since the index was built), not the index's own top k."""
    tr = Trainer(tiny_cfg(**{"rag.mode": "end2end", "rag.n_docs": 3, "rag.rerank_top": 12, "index.refresh_every": 0,
                             "index.refresh_at_end": "false", "train.max_steps": 3,
                             "train.context_encoder_lr": 5e-2}))
    final = tr.train()
    assert tr.index_version == 1  # stale index: only the live encoder moved
    # the cost the quality benchmark reports: every step re-encodes its distinct candidates (<= batch x L), and no
    # refresh after the initial build
    assert 3 * 4 < final["rerank_passages"] <= 3 * 4 * 12 and final["rerank_seconds"] > 0
    assert final["rerank_eval_passages"] > 0  # the final evaluation loss re-ranks too, counted apart
    assert final["refresh_passages"] == len(tr.kb)
    tr.model.train()
    batch = next(iter(tr.train_loader))
    rag = tr.unwrapped
    with torch.no_grad():
        q = rag.encode_questions(batch["q_input_ids"], batch["q_attention_mask"])
    docs = tr._make_retrieve(batch)(q, True, False)
    stale = tr.search(q, batch["questions"], 12)["ids"]
    rag.context_encoder.eval()
    for b in range(q.shape[0]):
        cand = stale[b].tolist()
        with torch.no_grad():
            c = rag.encode_passages(**{k: v for k, v in zip(("input_ids", "attention_mask"),
                                                             tr._passage_inputs(cand).values())})
        live = (q[b] @ c.T).tolist()
        want = [cand[j] for j in sorted(range(12), key=lambda j: -live[j])[:3]]
        assert docs["doc_ids"][b].tolist() == want
    assert any(docs["doc_ids"][b].tolist() != stale[b, :3].tolist() for b in range(q.shape[0]))


def test_rerank_config_is_validated(tiny_cfg):
    from ragtrain.config import ConfigError

    with pytest.raises(ConfigError, match="rag.rerank_top: must be 0"):
        tiny_cfg(**{"rag.rerank_top": 2})  # n_docs is 3
    with pytest.raises(ConfigError, match="rag.rerank_top: rag.mode=original"):
        tiny_cfg(**{"rag.mode": "original", "rag.rerank_top": 6})


@pytest.mark.parametrize("refresh_at_end", [True, False])
def test_final_index_is_encoded_by_the_exported_context_encoder(tiny_cfg, refresh_at_end):
    """end2end with refresh_every=0 (and a last refresh before the last step): the export's index holds the final
    context encoder's vectors -- re-encoded after the last step -- or, opted out, the export has no index."""
    tr = Trainer(tiny_cfg(**{"rag.mode": "end2end", "index.refresh_every": "0-3:2", "train.max_steps": 3,
                             "index.refresh_at_end": str(refresh_at_end).lower(), "train.context_encoder_lr": 5e-2}))
    tr.train()
    final = tr.out / "final"
    meta = json.loads((final / "ragtrain.json").read_text())
    if not refresh_at_end:
        assert tr.index_version == 2 and not (final / "index").exists()
        return
    assert tr.index_version == 3 and tr.last_refresh_step == 3
    fresh = tr.encode_kb()
    np.testing.assert_allclose(np.load(final / "index" / "embeddings.npy"), fresh, atol=1e-5)
    assert meta["index_version"] == 3


def test_exported_encoders_load_in_sentence_transformers_and_give_the_index_vectors(tiny_cfg):
    """`SentenceTransformer(final/context_encoder).encode(passage_format.format(...))` = the exported index's
    vectors; the question encoder = the vectors training searched with (mean pooling + L2 normalisation here)."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    from ragtrain.data.kb import load_kb

    tr = Trainer(tiny_cfg(**{"rag.mode": "end2end", "train.max_steps": 2, "model.pooling": "mean",
                             "model.normalize": "true", "train.context_encoder_lr": 5e-2}))
    tr.train()
    final = tr.out / "final"
    meta = json.loads((final / "ragtrain.json").read_text())
    from ragtrain.model.loading import resolve_kb_dir

    kb = load_kb(resolve_kb_dir(final, meta["kb_dir"]))
    fmt = meta["passage_format"]
    texts = [fmt.format(title=t, text=x) if t else x for t, x in zip(kb["title"], kb["text"])]
    st = sentence_transformers.SentenceTransformer(str(final / "context_encoder"), device="cpu")
    assert st.max_seq_length == tr.cfg.model.max_passage_length
    np.testing.assert_allclose(st.encode(texts, batch_size=7), np.load(final / "index" / "embeddings.npy"),
                               atol=1e-5)
    questions = [ex["question"] for ex in tr.splits["train"][:5]]
    st_q = sentence_transformers.SentenceTransformer(str(final / "question_encoder"), device="cpu")
    q_in = tr.collator.questions(questions)
    with torch.no_grad():
        ours = tr.unwrapped.encode_questions(q_in["q_input_ids"], q_in["q_attention_mask"]).numpy()
    np.testing.assert_allclose(st_q.encode(questions), ours, atol=1e-5)


@pytest.mark.parametrize("retriever,mode,loss_type", [("dense", "end2end", "sequence"), ("bm25", "original", "sequence"),
                                                      ("hybrid", "original", "token")])
def test_ragtrain_eval_reproduces_the_runs_own_final_evaluation(tiny_cfg, retriever, mode, loss_type, capsys):
    """`ragtrain eval --checkpoint final --data OUTPUT_DIR/splits/test.jsonl`, with no other option, prints the same
    metrics as the run's last metrics.jsonl row: same retriever, p(z|x) (mode, temperature), decoding, index."""
    from ragtrain import cli

    tr = Trainer(tiny_cfg(**{"rag.mode": mode, "index.retriever": retriever, "rag.loss_type": loss_type,
                             "rag.retrieval_temperature": 0.5, "index.refresh_every": 0, "train.max_steps": 3,
                             "eval.recall_ks": "1,3", "eval.max_new_tokens": 3, "eval.batch_size": 3}))
    tr.train()
    last = [json.loads(x) for x in (tr.out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["split"] == "test"
    capsys.readouterr()
    assert cli.main(["eval", "--checkpoint", str(tr.out / "final"), "--data", str(tr.out / "splits" / "test.jsonl"),
                     "--predictions", str(tr.out / "cli_predictions.jsonl")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    keys = ("n", "n_generated", "em", "f1", "bleu", "rougeL", "recall@1", "recall@3", "mrr")
    assert {k: report[k] for k in keys} == {k: last[k] for k in keys}
    ours = [json.loads(x) for x in (tr.out / "predictions_test.jsonl").read_text().splitlines()]
    theirs = [json.loads(x) for x in (tr.out / "cli_predictions.jsonl").read_text().splitlines()]
    assert [(r["prediction"], r["retrieved_ids"]) for r in theirs] == [(r["prediction"], r["retrieved_ids"]) for r in ours]


def test_ragtrain_index_encodes_like_training_without_loading_the_generator(tiny_cfg, monkeypatch, capsys):
    import transformers

    from ragtrain import cli

    tr = Trainer(tiny_cfg(**{"rag.mode": "end2end", "train.max_steps": 2, "train.context_encoder_lr": 5e-2}))
    tr.train()

    def no_generator(*a, **k):
        raise AssertionError("ragtrain index loaded the generator")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_generator)
    out = tr.out / "reindexed"
    assert cli.main(["index", "--checkpoint", str(tr.out / "final"), "--kb", str(tr.out / "kb"), "--out", str(out),
                     "--batch-size", "5", "--device", "cpu"]) == 0
    new = np.load(out / "v000001" / "embeddings.npy")
    np.testing.assert_allclose(new, np.load(tr.out / "final" / "index" / "embeddings.npy"), atol=1e-5)
    capsys.readouterr()
    assert cli.main(["index", "--checkpoint", str(tr.out / "final"), "--kb", str(tr.out / "kb"), "--out", str(out),
                     "--device", "cuda:7"]) == 2 or torch.cuda.is_available()
    assert "--device cuda:7" in capsys.readouterr().err or torch.cuda.is_available()


def test_logged_losses_are_what_their_names_say(tiny_cfg, monkeypatch):
    """metrics.jsonl: `loss` = the RAG NLL of the evaluated split (computed directly here), `train_loss` = the mean
    training loss since the previous evaluation; TensorBoard `train/loss` = the mean over the last log_every steps,
    with per-token NLL and every learning rate."""
    logged = []
    tr = Trainer(tiny_cfg(**{"train.max_steps": 4, "train.log_every": 2, "train.eval_every": 2,
                             "data.max_eval_examples": 5, "eval.batch_size": 2}))
    monkeypatch.setattr(tr.accelerator, "log", lambda values, step=None, **kw: logged.append((step, dict(values))))
    tr.train()
    steps = {r["step"]: r["loss"] for r in (json.loads(x) for x in (tr.out / "train_log.jsonl").read_text().splitlines())}
    rows = [json.loads(x) for x in (tr.out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in rows] == [(2, "validation"), (4, "test")]
    assert rows[0]["train_loss"] == pytest.approx((steps[1] + steps[2]) / 2)
    assert rows[1]["train_loss"] == pytest.approx((steps[3] + steps[4]) / 2)
    # the test loss, directly: one forward over all test questions, eval mode
    rag = tr.unwrapped
    rag.eval()
    batch = tr._collate(tr.splits["test"])
    with torch.no_grad():
        out = rag(batch["q_input_ids"], batch["q_attention_mask"], tr._make_retrieve(batch), with_gold=False)
    assert rows[1]["loss"] == pytest.approx(float(out.nll.mean()), rel=1e-5)
    assert rows[1]["nll_per_token"] == pytest.approx(float(out.nll.sum() / out.n_tokens), rel=1e-5)
    assert rows[1]["loss"] != pytest.approx(rows[1]["train_loss"], rel=1e-3)
    train_logs = {step: v for step, v in logged if "train/loss" in v}
    assert sorted(train_logs) == [1, 2, 4]
    assert train_logs[4]["train/loss"] == pytest.approx((steps[3] + steps[4]) / 2)
    assert {"lr/generator", "lr/question_encoder", "lr/context_encoder"} <= set(train_logs[4])
    assert np.isfinite(train_logs[4]["train/nll_per_token"]) and train_logs[4]["train/perplexity"] > 1
    assert any("validation/loss" in v and v["validation/loss"] == rows[0]["loss"] for _, v in logged)


def test_ivf_auto_nprobe_is_tuned_for_the_retrieved_depth_and_stored_with_the_version(tiny_cfg):
    """index.nlist / index.nprobe default to auto: the trainer tunes nprobe for the depth it retrieves
    (max(n_docs, rerank_top)) to index.target_recall, and the version's meta.json records the tuned value."""
    import json

    tr = Trainer(tiny_cfg(**{"index.kind": "ivf", "rag.mode": "end2end", "rag.n_docs": 3, "rag.rerank_top": 5,
                             "index.target_recall": 0.7}))
    assert tr.cfg.index.nlist == "auto" and tr.cfg.index.nprobe == "auto"
    meta = json.loads((tr.store.current_dir() / "meta.json").read_text())
    tuned = meta["params"]["tuned_nprobe"]
    assert meta["params"]["nprobe"] == "auto" and meta["params"]["target_recall"] == 0.7
    assert tuned["k"] == 5 and tuned["recall"] >= 0.7 and 1 <= tuned["nprobe"] <= meta["params"]["effective_nlist"]
