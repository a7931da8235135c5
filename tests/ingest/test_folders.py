"""Folders with odd entries: FIFOs, sockets, devices, broken and looping links, unreadable files
and files that vanish or change mid-run fail alone with a reason; the run never hangs, never
prints a traceback, commits the good files and leaves the write lock free."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ingest.pipeline import IngestOptions, Progress, ingest_paths
from retrieval.kb import KnowledgeBase
from tests.ingest.conftest import ENV, failures

REPO = Path(__file__).resolve().parents[2]


def moerag(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real CLI as a process; a hang fails the test through `timeout`."""
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def good_files(folder: Path) -> None:
    (folder / "sub").mkdir(parents=True)
    (folder / "cats.md").write_text("# Cats\n\nCats are small carnivorous mammals that purr when content.\n")
    (folder / "rockets.txt").write_text("Liquid-fuel rockets burn kerosene and liquid oxygen in a combustion chamber.\n")
    (folder / "sub" / "owls.txt").write_text("Barn owls swallow mice whole and cough up pellets of bone and fur.\n")


@pytest.mark.slow
def test_odd_entries_fail_alone_and_the_good_files_are_committed(tmp_path):
    folder, home = tmp_path / "docs", tmp_path / "home"
    good_files(folder)
    os.mkfifo(folder / "pipe")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(folder / "listener"))
    (folder / "dangling").symlink_to("nowhere.txt")
    (folder / "loop-a").symlink_to("loop-b")
    (folder / "loop-b").symlink_to("loop-a")
    (folder / "sublink").symlink_to("sub", target_is_directory=True)  # not followed: owls.txt is ingested once
    (folder / "null").symlink_to("/dev/null")
    with open(os.fsencode(folder) + b"/caf\xe9.txt", "wb") as fh:  # a Latin-1 name: not valid UTF-8
        fh.write(b"Coffee is brewed from roasted beans.\n")
    try:
        r = moerag("ingest", str(folder), "--home", str(home))
    finally:
        sock.close()

    assert "Traceback" not in r.stdout + r.stderr
    assert r.returncode == 2, r  # some files failed; the run itself did not
    assert failures(r.stdout) == {
        "pipe": "not a regular file (FIFO)",
        "listener": "not a regular file (socket)",
        "dangling": "broken symbolic link -> nowhere.txt",
        "loop-a": "symbolic link loop",
        "loop-b": "symbolic link loop",
        "null": "not a regular file (character device)",
        "caf\ufffd.txt": "file name is not valid UTF-8 (rename the file)",
    }
    with KnowledgeBase(home).write_lock():  # free: nothing is left holding it
        pass
    hits = json.loads(moerag("search", "why do owls cough up pellets", "--json", "--home", str(home)).stdout)
    sources = [h["document"]["source"] for h in hits]
    assert str((folder / "sub" / "owls.txt").resolve()) in sources
    assert str((folder / "cats.md").resolve()) in sources
    assert not any("sublink" in s for s in sources)


class _Meddle(Progress):
    """Changes the folder after the walk, before any file is read (the way another process might)."""

    def __init__(self, change):
        self.change = change

    def start(self, files: int) -> None:
        self.change()


def _by_name(report) -> dict[str, tuple[str, str | None]]:
    return {Path(r.source).name: (r.status, r.error) for r in report.results}


@pytest.mark.timeout(60)  # a FIFO opened for reading would block here forever
def test_files_that_vanish_or_change_mid_run_fail_alone(kb, embedder, tmp_path):
    folder = tmp_path / "docs"
    good_files(folder)
    for name in ("gone.txt", "now-fifo.txt", "now-link.txt"):
        (folder / name).write_text("Tawny owls nest in tree holes and old crow nests.\n")

    def change():
        (folder / "gone.txt").unlink()
        (folder / "now-fifo.txt").unlink()
        os.mkfifo(folder / "now-fifo.txt")
        (folder / "now-link.txt").unlink()
        (folder / "now-link.txt").symlink_to("/dev/zero")

    report = ingest_paths(kb, embedder, [folder], collection="default", progress=_Meddle(change))
    got = _by_name(report)
    assert got["gone.txt"] == ("failed", "file disappeared during ingest")
    assert got["now-fifo.txt"] == ("failed", "not a regular file (FIFO)")
    assert got["now-link.txt"] == ("failed", "file changed during ingest (it is now a symbolic link)")
    assert {got[n][0] for n in ("cats.md", "rockets.txt", "owls.txt")} == {"added"}
    with kb.write_lock():
        pass


@pytest.mark.timeout(60)
def test_a_fifo_or_broken_link_named_on_the_command_line_fails_alone(kb, embedder, tmp_path):
    os.mkfifo(tmp_path / "pipe.txt")
    (tmp_path / "dangling.md").symlink_to(tmp_path / "missing.md")
    (tmp_path / "ok.txt").write_text("Little owls are active by day as well as at night.\n")
    report = ingest_paths(kb, embedder, [tmp_path / "pipe.txt", tmp_path / "dangling.md", tmp_path / "ok.txt"],
                          collection="default")
    assert _by_name(report) == {
        "pipe.txt": ("failed", "not a regular file (FIFO)"),
        "dangling.md": ("failed", f"broken symbolic link -> {tmp_path / 'missing.md'}"),
        "ok.txt": ("added", None),
    }


def test_unreadable_files_fail_alone_with_the_reason(kb, embedder, tmp_path, monkeypatch):
    folder = tmp_path / "docs"
    good_files(folder)
    secret = folder / "secret.txt"
    secret.write_text("The password is swordfish.\n")
    if os.geteuid() != 0:
        secret.chmod(0)
        (folder / "sub").chmod(0)  # a folder that cannot be listed is reported too
    else:
        # root reads any file whatever its mode: make the kernel's refusal happen for this one path
        real_open = os.open

        def refusing_open(path, flags, *args, **kwargs):
            if Path(path) == secret.resolve():
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr("ingest.files.os.open", refusing_open)
    try:
        report = ingest_paths(kb, embedder, [folder], collection="default", options=IngestOptions())
    finally:
        (folder / "sub").chmod(0o755)
        secret.chmod(0o644)
    got = _by_name(report)
    assert got["secret.txt"] == ("failed", "cannot read file: Permission denied")
    assert got["cats.md"][0] == got["rockets.txt"][0] == "added"
    if os.geteuid() != 0:
        assert got["sub"] == ("failed", "cannot read folder: Permission denied")
