"""Evaluation: the metrics are the standard ones, and retrieval on real SciFact data is good."""

import math

import pytest

from app.evaluate import evaluate, metrics
from app.settings import load_settings


def test_metrics_match_hand_computed_values():
    m = metrics(["a", "x", "b", "y"], {"a", "b", "c"})
    dcg = 1 + 1 / math.log2(4)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg@10"] == pytest.approx(dcg / idcg)
    assert m["recall@10"] == pytest.approx(2 / 3) and m["mrr@10"] == 1.0
    assert metrics(["x", "y", "a"], {"a"})["mrr@10"] == pytest.approx(1 / 3)
    assert metrics(["x"] * 10 + ["a"], {"a"})["recall@10"] == 0.0


@pytest.mark.slow
def test_scifact_subset_quality_and_fusion_helps(shared_eval, embedder, tmp_path):
    settings = load_settings(home=tmp_path, env={})
    rows = {
        r["mode"]: r
        for r in evaluate(shared_eval / "scifact", settings=settings, embedder=embedder, modes=["dense", "bm25", "hybrid"], limit_docs=600)
    }
    assert rows["dense"]["queries"] >= 20 and rows["dense"]["documents"] == 600
    # On the whole corpus these are 0.66 / 0.69 / 0.72 (bench/retrieval.py); a 600-document slice is easier.
    assert rows["dense"]["ndcg@10"] > 0.6 and rows["bm25"]["ndcg@10"] > 0.6
    assert rows["hybrid"]["ndcg@10"] >= max(rows["dense"]["ndcg@10"], rows["bm25"]["ndcg@10"]) - 0.02
    assert rows["hybrid"]["recall@100"] >= 0.9
