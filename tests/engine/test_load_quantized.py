"""Quantizing while loading (layer by layer) and quantized checkpoints that load as they are stored."""

from __future__ import annotations

import gc
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import engine
from engine.export import quantize_checkpoint
from engine.loader import QUANTIZATION_LAYOUT, load_checkpoint
from engine.quantization import TARGETS, quantize_modules
from tests.engine.cases import INIT, VOCAB
from tests.engine.checkpoints import save

PROMPT = torch.arange(3, VOCAB, 17)[:16]
LAYERS = 6


def _live_tensors() -> list[torch.Tensor]:
    with warnings.catch_warnings():  # isinstance on some torch.distributed aliases warns
        warnings.simplefilter("ignore")
        return [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]


def _float_bytes_alive(before: set[int]) -> int:
    """Bytes of float tensors alive now that were not alive at `before` (one count per storage)."""
    storages: dict[int, int] = {}
    for t in _live_tensors():
        if id(t) not in before and t.is_floating_point() and not t.is_meta:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.fixture(scope="module")
def deep_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six MoE layers whose experts dwarf everything else, as in real MoE checkpoints."""
    torch.manual_seed(7)
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=64,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=16, num_experts_per_tok=2, initializer_range=INIT,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    model = transformers.Qwen3MoeForCausalLM(config).eval()
    return save(model, tmp_path_factory.mktemp("deep"))


def test_loading_with_quantize_holds_one_float_layer_at_a_time(deep_checkpoint: Path) -> None:
    # Count the float bytes alive in the whole process each time a layer is handed to the
    # transform (after it is quantized): a leaked reference to any earlier layer's float
    # weights (in the loader, the filler, a closure) would show up here, whatever the allocator.
    before = {id(t) for t in _live_tensors()}
    peaks: list[int] = []

    def transform(module: torch.nn.Module) -> None:
        quantize_modules(module, "int8")
        gc.collect()
        peaks.append(_float_bytes_alive(before))

    loaded = load_checkpoint(deep_checkpoint, transform=transform)
    float_model = engine.load_model(deep_checkpoint).net
    layer_bytes = sum(p.nbytes for p in float_model.model.layers[0].parameters())
    whole_bytes = sum(p.nbytes for p in float_model.parameters())
    outside_bytes = whole_bytes - LAYERS * layer_bytes  # embeddings, head, final norm
    assert len(peaks) == LAYERS + 2  # the head (before any layer), each layer, then the whole model
    layers = peaks[1 : LAYERS + 1]
    # Growing by one layer's scales at most, never by a layer's float weights.
    assert max(layers) < outside_bytes + 1.2 * layer_bytes
    assert layers[-1] - layers[0] < 0.2 * layer_bytes
    assert max(peaks) < 0.6 * whole_bytes  # loading then quantizing would hold all of it
    assert not any(p.dtype.is_floating_point and p.dim() == 3 for p in loaded.net.model.layers.parameters())


@pytest.mark.parametrize(("scheme", "group"), [("int8", 128), ("int4", 32)])
def test_quantizing_while_loading_equals_quantizing_after(deep_checkpoint: Path, scheme: str, group: int) -> None:
    streamed = engine.load_model(deep_checkpoint, quantize=scheme, group_size=group)
    after = engine.quantize(engine.load_model(deep_checkpoint), scheme, group_size=group)
    assert torch.equal(streamed.logits(PROMPT), after.logits(PROMPT))
    assert streamed.quantization == {"scheme": scheme, "group_size": group, "targets": TARGETS}


@pytest.mark.parametrize(("scheme", "group", "case"), [("int8", 128, "qwen3_moe_awkward"), ("int4", 32, "qwen2")])
def test_quantized_checkpoint_loads_as_stored(
    tiny_checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scheme: str, group: int, case: str
) -> None:
    _, src = tiny_checkpoint(case)  # qwen2 and the awkward Qwen3-MoE tie the head to the embeddings
    in_memory = engine.load_model(src, quantize=scheme, group_size=group)
    quantize_checkpoint(src, tmp_path / "q", scheme=scheme, group_size=group)

    def refuse(w: torch.Tensor, *args: object) -> object:
        raise AssertionError("a stored quantized checkpoint must not be quantized again")

    module = sys.modules["engine.quantization"]
    real = getattr(module, f"quantize_{scheme}")
    # Quantizing on the meta device (building the modules' shapes) is allowed; real data is not.
    monkeypatch.setattr(module, f"quantize_{scheme}", lambda w, *a: real(w, *a) if w.is_meta else refuse(w))
    loaded = engine.load_model(tmp_path / "q")
    assert torch.equal(loaded.logits(PROMPT), in_memory.logits(PROMPT))
    assert loaded.generate(PROMPT, max_new_tokens=8) == in_memory.generate(PROMPT, max_new_tokens=8)
    assert loaded.quantization is not None and loaded.quantization["scheme"] == scheme

    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["moerag_quantization"] == {
        "scheme": scheme,
        "group_size": group,
        "targets": list(TARGETS),
        "layout": QUANTIZATION_LAYOUT,
    }
    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["moerag_quantization"])["scheme"] == scheme
    assert (tmp_path / "q" / "generation_config.json").is_file()
    size = (tmp_path / "q" / "model.safetensors").stat().st_size
    assert size < 0.6 * (src / "model.safetensors").stat().st_size


def test_quantized_checkpoint_keeps_the_tokenizer(chat_checkpoint: Path, tmp_path: Path) -> None:
    quantize_checkpoint(chat_checkpoint, tmp_path / "q", scheme="int8")
    messages = [{"role": "user", "content": "hello"}]
    want = engine.load_model(chat_checkpoint, quantize="int8").complete(messages, max_new_tokens=6)
    assert engine.load_model(tmp_path / "q").complete(messages, max_new_tokens=6) == want


def test_requantizing_a_quantized_checkpoint_is_refused(tiny_checkpoint, tmp_path: Path) -> None:
    _, src = tiny_checkpoint("qwen3_moe")
    quantize_checkpoint(src, tmp_path / "q", scheme="int8")
    with pytest.raises(engine.EngineError, match="already quantized"):
        engine.load_model(tmp_path / "q", quantize="int4")
    with pytest.raises(engine.EngineError, match="already holds a checkpoint"):
        quantize_checkpoint(src, tmp_path / "q", scheme="int8")
