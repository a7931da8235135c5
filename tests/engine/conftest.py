"""Engine fixtures: tiny random checkpoints on disk, built once per session with transformers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.engine.checkpoints import CASES, add_tokenizer, save


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[nn.Module, Path]]:
    """name -> (transformers reference model, checkpoint directory); cached per session."""
    cache: dict[str, tuple[nn.Module, Path]] = {}

    def get(name: str) -> tuple[nn.Module, Path]:
        if name not in cache:
            torch.manual_seed(sum(map(ord, name)))  # a fixed seed per case, independent of test order
            model = CASES[name].build()
            cache[name] = (model, save(model, tmp_path_factory.mktemp(name)))
        return cache[name]

    return get


@pytest.fixture(scope="session")
def chat_checkpoint(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen3-MoE checkpoint plus a byte-level BPE tokenizer trained here (never downloaded)."""
    import shutil

    _, path = tiny_checkpoint("qwen3_moe")
    directory = Path(shutil.copytree(path, tmp_path_factory.mktemp("chat") / "ckpt"))
    return add_tokenizer(directory)
