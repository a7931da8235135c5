"""Checkpoint loading: layouts that must load identically, and broken checkpoints that must say what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import engine
from engine.errors import CheckpointError, MissingTensorError, TensorShapeError, UnexpectedTensorError
from tests.engine.cases import VOCAB
from tests.engine.checkpoints import save

TOKENS = torch.arange(0, VOCAB, 13)[:20]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(directory: Path, edit) -> None:
    """Load model.safetensors, let `edit` change the dict, and write it back."""
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _stack_experts(tensors: dict[str, torch.Tensor]) -> None:
    """Replace per-expert tensors by the stacked [E, 2I, H] / [E, H, I] layout."""
    prefixes = sorted({k.split(".experts.")[0] for k in tensors if ".experts." in k})
    for prefix in prefixes:
        experts = sorted(
            {int(k.split(".experts.")[1].split(".")[0]) for k in tensors if k.startswith(prefix + ".experts.")}
        )
        gate_up = [
            torch.cat(
                [
                    tensors.pop(f"{prefix}.experts.{e}.gate_proj.weight"),
                    tensors.pop(f"{prefix}.experts.{e}.up_proj.weight"),
                ]
            )
            for e in experts
        ]
        down = [tensors.pop(f"{prefix}.experts.{e}.down_proj.weight") for e in experts]
        tensors[f"{prefix}.experts.gate_up_proj"] = torch.stack(gate_up)  # [E, 2I, H]
        tensors[f"{prefix}.experts.down_proj"] = torch.stack(down)  # [E, H, I]


def test_sharded_checkpoint_loads_like_single_file(tiny_checkpoint, tmp_path: Path) -> None:
    ref, path = tiny_checkpoint("qwen3_moe")
    sharded = save(ref, tmp_path / "sharded", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    expected = engine.load_model(path).logits(TOKENS)
    assert torch.equal(engine.load_model(sharded).logits(TOKENS), expected)


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3"])
def test_stacked_expert_layout_loads_like_per_expert(tiny_checkpoint, tmp_path: Path, name: str) -> None:
    _, path = tiny_checkpoint(name)
    stacked = _copy(path, tmp_path / "stacked")
    _rewrite(stacked, _stack_experts)
    expected = engine.load_model(path).logits(TOKENS)
    assert torch.equal(engine.load_model(stacked).logits(TOKENS), expected)


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path: Path) -> None:
    _, path = tiny_checkpoint("qwen3_moe")
    broken = _copy(path, tmp_path / "broken")
    _rewrite(broken, lambda t: t.pop("model.layers.1.mlp.experts.5.up_proj.weight"))
    with pytest.raises(MissingTensorError, match=r"model\.layers\.1\.mlp\.experts\.5\.up_proj\.weight"):
        engine.load_model(broken)


def test_missing_dense_tensor_is_named(tiny_checkpoint, tmp_path: Path) -> None:
    _, path = tiny_checkpoint("deepseek_v3")
    broken = _copy(path, tmp_path / "broken")
    _rewrite(broken, lambda t: t.pop("model.layers.0.self_attn.kv_b_proj.weight"))
    with pytest.raises(MissingTensorError, match=r"model\.layers\.0\.self_attn\.kv_b_proj\.weight"):
        engine.load_model(broken)


def test_unexpected_tensor_is_named(tiny_checkpoint, tmp_path: Path) -> None:
    _, path = tiny_checkpoint("qwen3_moe")
    broken = _copy(path, tmp_path / "broken")
    _rewrite(broken, lambda t: t.update({"model.layers.0.mlp.router_bias": torch.zeros(8)}))
    with pytest.raises(UnexpectedTensorError, match=r"model\.layers\.0\.mlp\.router_bias"):
        engine.load_model(broken)


def test_expert_beyond_config_is_unexpected(tiny_checkpoint, tmp_path: Path) -> None:
    _, path = tiny_checkpoint("mixtral")
    broken = _copy(path, tmp_path / "broken")
    _rewrite(broken, lambda t: t.update({"model.layers.0.block_sparse_moe.experts.6.w1.weight": torch.zeros(32, 64)}))
    with pytest.raises(UnexpectedTensorError, match=r"experts\.6\.w1\.weight"):
        engine.load_model(broken)


def test_tensor_given_twice_is_rejected(tiny_checkpoint, tmp_path: Path) -> None:
    _, path = tiny_checkpoint("qwen3_moe")
    both = _copy(path, tmp_path / "both")

    def add_stacked_copy(tensors: dict[str, torch.Tensor]) -> None:
        per_expert = dict(tensors)
        _stack_experts(per_expert)
        tensors["model.layers.0.mlp.experts.down_proj"] = per_expert["model.layers.0.mlp.experts.down_proj"]

    _rewrite(both, add_stacked_copy)
    with pytest.raises(UnexpectedTensorError, match=r"model\.layers\.0\.mlp\.experts.*more than once"):
        engine.load_model(both)


def test_wrong_shape_is_named(tiny_checkpoint, tmp_path: Path) -> None:
    _, path = tiny_checkpoint("llama")
    broken = _copy(path, tmp_path / "broken")
    _rewrite(broken, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(95, 64)}))
    with pytest.raises(TensorShapeError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*\(95, 64\).*\(96, 64\)"):
        engine.load_model(broken)


def test_unknown_model_type_is_named(tiny_checkpoint, tmp_path: Path) -> None:
    _, path = tiny_checkpoint("llama")
    other = _copy(path, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "mamba_moe"
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(engine.UnsupportedArchitectureError, match=r"mamba_moe.*qwen3_moe"):
        engine.load_model(other)


def test_missing_shard_is_named(tiny_checkpoint, tmp_path: Path) -> None:
    ref, _ = tiny_checkpoint("qwen3_moe")
    sharded = save(ref, tmp_path / "sharded", max_shard_size="40KB")
    victim = sorted(sharded.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        engine.load_model(sharded)


def test_directory_without_config_or_weights(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="No config.json"):
        engine.load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="lacks"):
        engine.load_model(tmp_path)


def test_path_that_is_neither_directory_nor_hub_id(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a hub id"):
        engine.load_model(tmp_path / "no" / "such" / "model")


def test_fp8_scales_get_a_hint(tiny_checkpoint, tmp_path: Path) -> None:
    _, path = tiny_checkpoint("deepseek_v3")
    fp8 = _copy(path, tmp_path / "fp8")
    _rewrite(fp8, lambda t: t.update({"model.layers.0.self_attn.o_proj.weight_scale_inv": torch.ones(1, 1)}))
    with pytest.raises(UnexpectedTensorError, match="FP8"):
        engine.load_model(fp8)


def test_deepseek_mtp_layer_is_ignored(tiny_checkpoint, tmp_path: Path) -> None:
    _, path = tiny_checkpoint("deepseek_v3")
    mtp = _copy(path, tmp_path / "mtp")
    # num_nextn_predict_layers=1 (the default): layer 4 follows the 4 decoder layers.
    _rewrite(mtp, lambda t: t.update({"model.layers.4.eh_proj.weight": torch.zeros(64, 128)}))
    expected = engine.load_model(path).logits(TOKENS)
    assert torch.equal(engine.load_model(mtp).logits(TOKENS), expected)


def test_tied_head_is_shared_not_copied(tiny_checkpoint) -> None:
    _, path = tiny_checkpoint("qwen2")
    net = engine.load_model(path).net
    assert net.lm_head.weight is net.model.embed_tokens.weight


def _edit_config(directory: Path, edit) -> None:
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (directory / "config.json").write_text(json.dumps(config))


def test_official_style_configs_load_the_same(tiny_checkpoint, tmp_path: Path) -> None:
    """Hub checkpoints predate transformers 5: rope_theta + rope_scaling {"type": ...}, num_experts."""
    _, path = tiny_checkpoint("deepseek_v3_yarn")
    old = _copy(path, tmp_path / "old_deepseek")

    def to_old_rope(config: dict) -> None:
        rope = config.pop("rope_parameters")
        config["rope_theta"] = rope.pop("rope_theta")
        rope["type"] = rope.pop("rope_type")
        config["rope_scaling"] = rope
        config.update(scoring_func="sigmoid", topk_method="noaux_tc", n_routed_experts=config["n_routed_experts"])

    _edit_config(old, to_old_rope)
    assert torch.equal(engine.load_model(old).logits(TOKENS), engine.load_model(path).logits(TOKENS))

    _, qpath = tiny_checkpoint("qwen3_moe")
    renamed = _copy(qpath, tmp_path / "old_qwen")
    _edit_config(renamed, lambda c: c.update(num_experts=c.pop("num_local_experts")))
    assert torch.equal(engine.load_model(renamed).logits(TOKENS), engine.load_model(qpath).logits(TOKENS))


def test_deepseek_v2_style_routing_is_refused(tiny_checkpoint, tmp_path: Path) -> None:
    _, path = tiny_checkpoint("deepseek_v3")
    v2 = _copy(path, tmp_path / "v2")
    _edit_config(v2, lambda c: c.update(scoring_func="softmax"))
    with pytest.raises(engine.UnsupportedArchitectureError, match="scoring_func='softmax'"):
        engine.load_model(v2)


@pytest.mark.parametrize(
    ("dtype", "stored", "expected"),
    [
        ("float32", None, torch.float32),
        ("bfloat16", None, torch.bfloat16),
        ("float16", None, torch.float16),
        (torch.bfloat16, None, torch.bfloat16),
        ("auto", "bfloat16", torch.bfloat16),
        ("auto", "float16", torch.float16),
        ("auto", "drop", torch.float32),  # config.json names no dtype: float32
    ],
)
def test_dtype_takes_the_names_transformers_takes(tiny_checkpoint, tmp_path: Path, dtype, stored, expected) -> None:
    _, path = tiny_checkpoint("qwen3_moe")
    if stored is not None:
        path = _copy(path, tmp_path / "ckpt")
        config = json.loads((path / "config.json").read_text())
        for key in ("torch_dtype", "dtype"):
            config.pop(key, None)
        if stored != "drop":
            config["torch_dtype"] = stored
        (path / "config.json").write_text(json.dumps(config))
    model = engine.load_model(path, dtype=dtype)
    assert model.net.model.embed_tokens.weight.dtype == expected
    assert model.net.lm_head.weight.dtype == expected
    assert model.logits(TOKENS).isfinite().all()


def test_an_unknown_dtype_names_the_allowed_ones(tiny_checkpoint, tmp_path: Path) -> None:
    from engine.errors import EngineError

    _, path = tiny_checkpoint("qwen3_moe")
    with pytest.raises(EngineError, match=r"Unknown dtype 'fp16'\. Use one of: float32, bfloat16, float16, auto"):
        engine.load_model(path, dtype="fp16")
    odd = _copy(path, tmp_path / "odd")
    config = json.loads((odd / "config.json").read_text())
    config.pop("dtype", None)
    config["torch_dtype"] = "int8"
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"gives dtype 'int8'.*pass one of: float32, bfloat16, float16"):
        engine.load_model(odd, dtype="auto")
