"""Engine fixtures: tiny random checkpoints on disk, built once per session with transformers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.engine.checkpoints import CASES, save


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


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


@pytest.fixture(scope="session")
def chat_checkpoint(tiny_checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen3-MoE checkpoint plus a byte-level BPE tokenizer trained here (never downloaded)."""
    import shutil

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    _, path = tiny_checkpoint("qwen3_moe")
    directory = Path(shutil.copytree(path, tmp_path_factory.mktemp("chat") / "ckpt"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,  # below the model's 320 rows
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["hello world, the engine answers questions about documents"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return directory
