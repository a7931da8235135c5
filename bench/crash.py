"""Crash safety: SIGKILL `moerag ingest` at random moments, again and again.

After every kill the store and the indexes must agree (`KnowledgeBase.check` finds no problem;
an index file that is merely behind is allowed, it is caught up on open), and a final run must
finish with every file ingested.

    .venv/bin/python -m bench.crash [--kills 20] [--files 300]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("index vector shard replica commit rollback latency throughput cache eviction quorum leader "
         "follower snapshot compaction tombstone bloom filter merge segment checksum").split()


def make_corpus(folder: Path, files: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        paras = []
        for p in range(rng.randint(3, 8)):
            paras.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 120))) + ".")
        (folder / f"note-{i:04d}.md").write_text(f"# Note {i}\n\n" + "\n\n".join(paras) + "\n")


def run_ingest(home: Path, folder: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from app.cli import main; main()", "ingest", str(folder), "--home", str(home)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=Path(__file__).resolve().parents[1])


def check(home: Path) -> tuple[list[str], list[str], int]:
    from retrieval.kb import KnowledgeBase

    kb = KnowledgeBase(home)
    with kb.store.session() as s:
        if "default" not in kb.store.collection_names(s):
            return [], ["no collection yet"], 0
        report = kb.check(s, kb.store.collection(s, "default"))
        return report.problems, report.notes, report.chunks


def _ingest_started(home: Path) -> bool:
    """True once the ingest has created its collection (model loaded, writing begun)."""
    db = home / "moerag.db"
    if not db.exists():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            return conn.execute("SELECT count(*) FROM collections").fetchone()[0] > 0
    except sqlite3.Error:
        return False


def kill_loop(home: Path, folder: Path, *, kills: int, window: float, seed: int = 0, log=print) -> list[dict]:
    """Start an ingest, SIGKILL it a random 0..`window` seconds after it begins writing; check; repeat.

    Timing from the first write (not from the start) keeps the kills inside the ingest however
    long the model takes to load on a busy machine.
    """
    rng = random.Random(seed)
    rows = []
    for i in range(kills):
        proc = run_ingest(home, folder)
        while proc.poll() is None and not _ingest_started(home):
            time.sleep(0.05)
        delay = rng.uniform(0, window)
        time.sleep(delay)
        finished = proc.poll() is not None
        if not finished:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        problems, notes, chunks = check(home)
        rows.append({"kill": i + 1, "after_s": round(delay, 2), "finished_first": finished, "chunks": chunks,
                     "problems": problems, "notes": notes})
        log(f"kill {i + 1:2d} {delay:5.2f} s into the ingest: {chunks:6d} chunks committed, "
            f"{'PROBLEMS: ' + '; '.join(problems) if problems else 'consistent'}{' (' + notes[0] + ')' if notes else ''}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--window", type=float, default=30.0, help="kill within this many seconds of the first write")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home, folder = Path(tmp, "home"), Path(tmp, "corpus")
        make_corpus(folder, args.files)
        rows = kill_loop(home, folder, kills=args.kills, window=args.window)
        proc = run_ingest(home, folder)
        _, err = proc.communicate()
        problems, notes, chunks = check(home)
        bad = sum(1 for r in rows if r["problems"])
        print(f"\n{len(rows)} kills, {bad} left the store and index disagreeing; "
              f"final run exit code {proc.returncode}, {chunks} chunks, "
              f"{'consistent' if not problems and not notes else problems + notes}")
        sys.exit(0 if bad == 0 and proc.returncode == 0 and not problems else 1)


if __name__ == "__main__":
    main()
