"""Parsing is contained: a bomb, a slow file, a memory-hungry file or a crashing parser fails
alone with its reason, in a worker process; the run goes on, the ingesting process stays small,
the write lock is free afterwards and nothing stored before is lost."""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import pytest

from ingest.errors import LoadError
from ingest.isolate import Runner
from ingest.limits import ParseLimits
from ingest.pipeline import IngestOptions, ingest_paths
from retrieval.kb import KnowledgeBase
from retrieval.search import search
from tests.ingest.conftest import ENV, failures
from tests.payloads import MB, docx_bomb, hungry_json, slow_pdf

REPO = Path(__file__).resolve().parents[2]


# --- helpers ----------------------------------------------------------------------------------


def good(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def statuses(report) -> dict[str, tuple[str, str | None]]:
    return {Path(r.source).name: (r.status, r.error) for r in report.results}


def found(kb: KnowledgeBase, word: str) -> set[str]:
    """The files whose chunks contain `word` (a lexical search, no embedder needed)."""
    return {Path(h.source).name for h in search(kb, word, embed=None, collection="default", k=5, mode="bm25")}


# --- the worker -------------------------------------------------------------------------------


def test_a_crashing_parser_costs_its_call_and_the_next_call_gets_a_fresh_worker():
    runner = Runner()
    limits = ParseLimits(parse_timeout=30)
    with pytest.raises(LoadError, match=r"^the parser crashed \(signal SIGSEGV\)$"):
        runner.run(partial(ctypes.string_at, 0), limits=limits)  # reads address 0: a segfault in C
    assert runner.run(partial(os.getpid), limits=limits) != os.getpid()  # a fresh worker answered
    with pytest.raises(ValueError, match="invalid literal"):  # a parser's own error comes back as itself
        runner.run(partial(int, "owl"), limits=limits)


# --- the pipeline, in this process ------------------------------------------------------------


@pytest.mark.slow
def test_each_file_over_a_limit_fails_alone_and_nothing_stored_before_is_lost(kb, embedder, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    good(folder, "a_owls.md", "# Owls\n\nBarn owls swallow mice whole and cough up pellets of bone and fur.\n")
    good(folder, "notes.txt", "Tawny owls call at night: the female calls kewick, the male answers hoo-hoo.\n")
    limits = ParseLimits(parse_timeout=4, parse_memory_mb=640, max_unpacked_mb=5, max_text_mb=0.05, max_elements=1000)
    options = IngestOptions(limits=limits)
    first = ingest_paths(kb, embedder, [folder], collection="default", options=options)
    assert {s for s, _ in statuses(first).values()} == {"added"}

    (folder / "b_bomb.docx").write_bytes(docx_bomb(8))
    (folder / "c_slow.pdf").write_bytes(slow_pdf())
    (folder / "d_hungry.json").write_bytes(hungry_json())
    (folder / "e_rows.csv").write_text("name,call\n" + "owl,hoot\n" * 2000)
    (folder / "notes.txt").write_text("Owls fly silently. " * 4000)  # 76 kB of text > 0.05 MB
    good(folder, "z_after.md", "# Little owls\n\nLittle owls bob their heads when curious.\n")
    start = time.monotonic()
    second = ingest_paths(kb, embedder, [folder], collection="default", options=options)
    seconds = time.monotonic() - start

    got = statuses(second)
    assert got["a_owls.md"][0] == "unchanged" and got["z_after.md"][0] == "added", got
    assert got["b_bomb.docx"][0] == "failed"
    assert re.fullmatch(r"too large when decompressed \(8\.\d MB > limit 5 MB; raise MOERAG_MAX_UNPACKED_MB\)", got["b_bomb.docx"][1])
    assert got["c_slow.pdf"] == ("failed", "parsing took longer than 4 s (MOERAG_PARSE_TIMEOUT)")
    assert got["d_hungry.json"] == ("failed", "parser ran out of memory (limit 640 MB; MOERAG_PARSE_MEMORY_MB)")
    assert got["e_rows.csv"] == ("failed", "too many elements (more than 1,000 rows; raise MOERAG_MAX_ELEMENTS)")
    status, reason = got["notes.txt"]
    assert status == "failed" and reason.startswith("too much text (0.072 MB > limit 0.05 MB; raise MOERAG_MAX_TEXT_MB)")
    assert reason.endswith("(kept the 1 chunks of the previous version)")
    assert seconds < 60, seconds  # the slow PDF alone would take minutes
    assert found(kb, "kewick") == {"notes.txt"}  # the previous version is still found
    assert found(kb, "bob") == {"z_after.md"}
    with kb.write_lock():  # free: taking it does not raise LockedError
        pass


# --- the real CLI, as a process ---------------------------------------------------------------


def peak_rss_mb(proc: subprocess.Popen) -> float:
    """The process's own peak resident memory (VmHWM, its children not included), read until it exits."""
    peak = 0
    while proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            break
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]))
        time.sleep(0.02)
    return peak / 1024


def moerag_ingest(folder: Path, home: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "app.cli", "ingest", str(folder), "--home", str(home)]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**ENV, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak: list[float] = []
    watcher = threading.Thread(target=lambda: peak.append(peak_rss_mb(proc)))
    watcher.start()
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
        watcher.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), peak[0]


@pytest.mark.slow
def test_moerag_ingest_survives_bombs_slow_and_hungry_files(tmp_path):
    home, folder, later = tmp_path / "home", tmp_path / "docs", tmp_path / "later"
    folder.mkdir()
    later.mkdir()
    good(folder, "a_owls.md", "# Owls\n\nBarn owls swallow mice whole and cough up pellets of bone and fur.\n")
    (folder / "b_bomb.docx").write_bytes(docx_bomb(300))
    (folder / "c_slow.pdf").write_bytes(slow_pdf())
    (folder / "d_hungry.json").write_bytes(hungry_json())
    good(folder, "z_after.txt", "Little owls bob their heads up and down when they are curious.\n")
    assert (folder / "b_bomb.docx").stat().st_size < 2 * MB

    hostile, peak_hostile = moerag_ingest(folder, home, MOERAG_PARSE_TIMEOUT="4", MOERAG_PARSE_MEMORY_MB="640")
    assert hostile.returncode == 2, hostile.stderr[-3000:]  # 2: some files failed; no traceback
    assert "Traceback" not in hostile.stderr
    reasons = failures(hostile.stdout)
    assert reasons.keys() == {"b_bomb.docx", "c_slow.pdf", "d_hungry.json"}, hostile.stdout
    assert re.fullmatch(r"too large when decompressed \(300\.\d MB > limit 200 MB; raise MOERAG_MAX_UNPACKED_MB\)",
                        reasons["b_bomb.docx"])
    assert reasons["c_slow.pdf"] == "parsing took longer than 4 s (MOERAG_PARSE_TIMEOUT)"
    assert reasons["d_hungry.json"] == "parser ran out of memory (limit 640 MB; MOERAG_PARSE_MEMORY_MB)"

    # The lock is free at once, and an ordinary run with the same model is the memory baseline.
    good(later, "tawny.txt", "Tawny owls call at night: the female calls kewick, the male answers hoo-hoo.\n")
    plain, peak_plain = moerag_ingest(later, home)
    assert plain.returncode == 0, plain.stderr[-3000:]
    # The ingesting process never held the hungry file's objects (~750 MB): parsing was elsewhere.
    assert peak_hostile < peak_plain + 150, (peak_hostile, peak_plain)

    kb = KnowledgeBase(home)
    assert found(kb, "pellets") == {"a_owls.md"}
    assert found(kb, "bob") == {"z_after.txt"}
    assert found(kb, "kewick") == {"tawny.txt"}
