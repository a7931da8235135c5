"""Helpers for the ingest tests that run `moerag ingest` as a process: its environment, and the
per-file failures it prints."""

from __future__ import annotations

import os
from pathlib import Path

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "COLUMNS": "500"}  # one line per failure, however long the temp paths


def failures(stdout: str) -> dict[str, str]:
    """file name -> reason, from the `failed PATH: REASON` lines `moerag ingest` prints."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("failed "):
            path, _, reason = line[len("failed "):].partition(": ")
            out[Path(path).name] = reason
    return out
