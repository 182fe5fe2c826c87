"""`ragtrain ask`: an exported run answers questions from its own index, as its evaluation does."""

import io
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from ragtrain.ask import Asker, format_answer, read_questions


@pytest.fixture(scope="module")
def moved_run(trained_run, tmp_path_factory):
    """The trained run moved elsewhere (its export records the KB relative to itself)."""
    out = tmp_path_factory.mktemp("moved") / "run"
    shutil.copytree(trained_run, out)
    return out


def test_ask_returns_the_indexs_top_passages_and_the_evaluations_answer(moved_run, monkeypatch):
    import ragtrain.eval.exported as exported

    encodes = []
    real = exported.encode_kb
    monkeypatch.setattr(exported, "encode_kb", lambda *a, **k: encodes.append(1) or real(*a, **k))
    test_rows = [json.loads(x) for x in (moved_run / "predictions_test.jsonl").read_text().splitlines()][:5]
    asker = Asker(moved_run / "final", max_new_tokens=4)  # the run's eval.max_new_tokens (tiny_overrides)
    assert asker.n_docs == 3  # answers decoded from the run's rag.n_docs passages, as its evaluation did
    results = asker.ask([r["question"] for r in test_rows], top=4, batch_size=2)
    assert encodes == [], "the KB must not be re-encoded: the export's index is used"
    emb = np.load(moved_run / "final" / "index" / "embeddings.npy")
    collator, rag = asker.collator, asker.rag
    for res, row in zip(results, test_rows):
        # the answer the trainer's final evaluation generated for this question, same model and decoding
        assert res["question"] == row["question"] and res["answer"] == row["prediction"]
        # the passages: the exact top 4 by inner product over the exported vectors, with those scores
        q_in = collator.questions([row["question"]])
        with torch.no_grad():
            q = rag.encode_questions(q_in["q_input_ids"], q_in["q_attention_mask"]).float().numpy()[0]
        want = np.argsort(-(emb @ q), kind="stable")[:4]
        got = [p["id"] for p in res["passages"]]
        assert got == want.tolist() == row["retrieved_ids"][:4]
        np.testing.assert_allclose([p["score"] for p in res["passages"]], (emb @ q)[want], rtol=1e-4, atol=1e-3)
        assert [p["rank"] for p in res["passages"]] == [1, 2, 3, 4]
        assert [p["text"] for p in res["passages"]] == [asker.kb[i]["text"] for i in got]


def test_ask_maps_each_answer_to_its_question(moved_run, monkeypatch):
    """With special tokens held back the tiny generator gives non-empty answers: each result carries the answer and
    passages predict() gives that question, in the order asked, across batches."""
    from ragtrain.eval.evaluate import predict

    asker = Asker(moved_run / "final", max_new_tokens=4)
    hf = asker.rag.generator.model
    real = hf.generate
    special = asker.collator.g_tok.all_special_ids
    monkeypatch.setattr(hf, "generate", lambda *a, **k: real(*a, **{**k, "suppress_tokens": special}))
    questions = ["Which river flows through the town?", "Who built the mill?", "When was the bridge built?",
                 "What did Tomas Quill invent?", "Where does the River Wend leave the lake?"]
    results = asker.ask(questions, top=2, batch_size=2)
    examples = [{"id": str(i), "question": q, "answers": [], "gold_passage_id": -1} for i, q in enumerate(questions)]
    want = predict(asker.rag, asker.collator, asker._search, asker.kb, examples, n_docs=asker.n_docs,
                   recall_depth=2, batch_size=2, max_new_tokens=4, show_progress=False)
    assert [r["answer"] for r in results] == [w["prediction"] for w in want]
    assert all(r["answer"].strip() for r in results)
    assert [[p["id"] for p in r["passages"]] for r in results] == [w["retrieved_ids"][:2] for w in want]


def test_ask_cli_text_and_json(moved_run, monkeypatch, capsys):
    from ragtrain.cli import main

    final = str(moved_run / "final")
    assert main(["ask", "--checkpoint", final, "--top", "2", "Which river flows through the town?"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "Q: Which river flows through the town?" and lines[1].startswith("A: ")
    assert [x.split()[0] for x in lines[2:]] == ["[1]", "[2]"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("first question?\n\n  second question?\n"))
    assert main(["ask", "--checkpoint", final, "--json", "--top", "3"]) == 0
    objs = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [o["question"] for o in objs] == ["first question?", "second question?"]
    assert all(len(o["passages"]) == 3 and isinstance(o["answer"], str) for o in objs)
    scores = [p["score"] for p in objs[0]["passages"]]
    assert scores == sorted(scores, reverse=True)


def test_ask_errors_are_one_line(moved_run, tmp_path, monkeypatch, capsys):
    from ragtrain.cli import main

    no_index = tmp_path / "final"
    shutil.copytree(moved_run / "final", no_index)
    shutil.rmtree(no_index / "index")
    assert main(["ask", "--checkpoint", str(no_index), "--kb", str(moved_run / "kb"), "q?"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "ragtrain index" in err[-1]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n  \n"))
    assert main(["ask", "--checkpoint", str(moved_run / "final")]) == 2
    assert "no question given" in capsys.readouterr().err.strip().splitlines()[-1]
    assert read_questions([], ["a?\n", "\n", "b?\n"]) == ["a?", "b?"]
    assert read_questions(["x?"], ["ignored\n"]) == ["x?"]


def test_format_answer():
    text = format_answer({"question": "q?", "answer": "a", "passages": [
        {"rank": 1, "id": 7, "score": 1.5, "title": "T", "text": "word " * 100}]}, width=80)
    q, a, p = text.splitlines()
    assert (q, a) == ("Q: q?", "A: a") and p.startswith("  [1] 1.500  #7  T: word") and len(p) <= 80
