"""`moerag` as a user runs it: exit codes, summaries, JSON shapes, errors without tracebacks."""

import json
from pathlib import Path

import pytest


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "notes"
    d.mkdir()
    (d / "tea.md").write_text("# Tea\n\nGreen tea is steamed or pan-fired soon after picking to stop oxidation.\n")
    (d / "coffee.txt").write_text("Espresso forces hot water through finely ground coffee at about nine bar.\n")
    return d


def test_ingest_search_and_list(cli, folder):
    r = cli("ingest", str(folder))
    assert r.code == 0, r
    assert "added" in r.stdout and "Traceback" not in r.stdout + r.stderr

    r = cli("search", "how is espresso made", "-k", "2", "--json")
    assert r.code == 0, r
    items = json.loads(r.stdout)
    assert items[0]["document"]["source"] == str(folder / "coffee.txt")
    assert items[0]["rank"] == 1 and items[0]["score"] >= items[-1]["score"]
    for key in ("rank", "score", "chunk_id", "text", "document", "page", "heading", "start", "end"):
        assert key in items[0]
    assert set(items[0]["document"]) >= {"id", "source", "title"}

    r = cli("search", "oxidation", "--mode", "bm25")
    assert r.code == 0 and "Tea" in r.stdout

    r = cli("docs", "list", "--json")
    docs = json.loads(r.stdout)
    assert {d["source"] for d in docs} == {str(folder / "tea.md"), str(folder / "coffee.txt")}
    assert all(d["status"] == "ok" and d["error"] is None and d["chunks"] >= 1 and d["title"] for d in docs)

    tea = next(d for d in docs if d["source"].endswith("tea.md"))
    r = cli("docs", "show", str(tea["id"]))
    assert r.code == 0 and "steamed or pan-fired" in r.stdout

    r = cli("docs", "rm", str(tea["id"]))
    assert r.code == 0
    assert [d["source"] for d in json.loads(cli("docs", "list", "--json").stdout)] == [str(folder / "coffee.txt")]
    assert cli("index", "check").code == 0


def test_exit_code_2_lists_each_failed_file_with_its_reason(cli, folder):
    (folder / "scan.pdf").write_bytes(b"%PDF-1.7\n garbage")
    (folder / "blob.dat").write_bytes(b"\x00\xff" * 500)
    r = cli("ingest", str(folder))
    assert r.code == 2, r
    assert "scan.pdf" in r.stdout and "blob.dat" in r.stdout
    docs = {Path(d["source"]).name: d for d in json.loads(cli("docs", "list", "--json").stdout)}
    assert docs["scan.pdf"]["status"] == "failed" and docs["scan.pdf"]["error"]
    assert docs["blob.dat"]["status"] == "failed" and "binary" in docs["blob.dat"]["error"]
    assert docs["tea.md"]["status"] == "ok"


def test_fatal_errors_exit_1_without_traceback(cli, tmp_path):
    r = cli("ingest", str(tmp_path / "does-not-exist"))
    assert r.code == 1 and "No such file or folder" in r.stderr and "Traceback" not in r.stderr
    r = cli("search", "anything", "--collection", "missing")
    assert r.code == 1 and "moerag ingest" in r.stderr
    r = cli("docs", "show", "999")
    assert r.code == 1 and "docs list" in r.stderr


def test_index_check_fails_on_a_broken_index_and_rebuild_repairs(cli, folder, home):
    assert cli("ingest", str(folder)).code == 0
    index_file = next((home / "index").glob("*.npz"))
    index_file.write_bytes(b"corrupted")
    r = cli("index", "check")
    assert r.code == 1 and "rebuild" in r.stdout
    r = cli("index", "rebuild")
    assert r.code == 0 and "2 chunks" in r.stdout
    assert cli("index", "check").code == 0


def test_eval_prints_metrics_as_json(cli, tmp_path):
    ds = tmp_path / "tiny"
    (ds / "qrels").mkdir(parents=True)
    corpus = [
        {"_id": "d1", "title": "Volcanoes", "text": "Magma rises through the crust and erupts as lava."},
        {"_id": "d2", "title": "Glaciers", "text": "Compacted snow becomes ice that flows slowly downhill."},
        {"_id": "d3", "title": "Deserts", "text": "Deserts receive less than 250 millimetres of rain a year."},
    ]
    (ds / "corpus.jsonl").write_text("\n".join(json.dumps(c) for c in corpus))
    queries = [{"_id": "q1", "text": "molten rock erupting"}, {"_id": "q2", "text": "rivers of ice"}]
    (ds / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries))
    (ds / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq2\td2\t1\n")
    r = cli("eval", str(ds), "--mode", "dense", "--json")
    assert r.code == 0, r
    res = json.loads(r.stdout)
    assert set(res) >= {"ndcg@10", "recall@10", "recall@100", "mrr@10", "queries", "documents", "ingest_seconds", "mode"}
    assert res["queries"] == 2 and res["documents"] == 3 and res["mode"] == "dense"
    assert res["ndcg@10"] == pytest.approx(1.0) and res["mrr@10"] == pytest.approx(1.0)
    r = cli("eval", str(tmp_path))
    assert r.code == 1 and "not a BEIR dataset" in r.stderr


def test_messy_real_pdfs_ingest_without_a_crash(cli, shared_eval):
    folder = shared_eval / "messy-docs" / "py-pdf-sample-files"
    r = cli("ingest", str(folder))
    assert r.code in (0, 2), r
    assert "Traceback" not in r.stdout + r.stderr
    docs = json.loads(cli("docs", "list", "--json").stdout)
    files = {str(p.resolve()) for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")}
    assert {d["source"] for d in docs} == files  # every file is accounted for
    for d in docs:
        assert (d["status"] == "ok" and d["chunks"] > 0) or (d["status"] == "failed" and d["error"]), d
    by_name = {Path(d["source"]).name: d for d in docs}
    assert "encrypted" in by_name["libreoffice-writer-password.pdf"]["error"]
    assert sum(d["status"] == "ok" for d in docs) >= 20


@pytest.mark.parametrize(
    "args,says",
    [
        (("search", "-k", "x", "q"), "Invalid value for '-k'"),
        (("nosuch",), "No such command 'nosuch'"),
        (("docs", "show"), "Missing argument"),
    ],
)
def test_usage_errors_say_what_is_wrong_and_exit_2(cli, args, says: str) -> None:
    # Typer raises its own copy of click's usage errors: they must read as usage, not as a crash.
    result = cli(*args)
    assert result.code == 2
    assert says in result.stderr and "Traceback" not in result.stderr + result.stdout
