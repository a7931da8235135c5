"""SIGKILL during `moerag ingest` never leaves the store and the indexes disagreeing."""

import pytest

from bench.crash import check, kill_loop, make_corpus, run_ingest


@pytest.mark.slow
def test_killed_ingests_leave_a_consistent_store_and_the_next_run_finishes(tmp_path):
    home, folder = tmp_path / "home", tmp_path / "corpus"
    make_corpus(folder, 120)
    # Kills land 0-6 s after the ingest starts writing: before, during and after batch commits.
    rows = kill_loop(home, folder, kills=3, window=6.0, seed=1, log=lambda _: None)
    assert all(not r["problems"] for r in rows), rows
    proc = run_ingest(home, folder)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    problems, notes, chunks = check(home)
    assert not problems and not notes and chunks > 0
    from retrieval.kb import KnowledgeBase
    from sqlalchemy import func, select
    from retrieval.store import Document

    kb = KnowledgeBase(home)
    with kb.store.session() as s:
        assert s.scalar(select(func.count(Document.id)).where(Document.status == "ok")) == 120
