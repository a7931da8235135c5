"""`moerag model info | quantize` and `moerag generate` on a tiny random Qwen3-MoE checkpoint (offline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import engine
from tests.engine.cases import CASES
from tests.engine.checkpoints import add_tokenizer, save

PROMPT = torch.arange(5, 300, 19)[:12]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two MoE layers, 8 experts, 2 per token, hidden 64, and a tokenizer with a chat template."""
    torch.manual_seed(11)
    directory = save(CASES["qwen3_moe"].build(), tmp_path_factory.mktemp("cli") / "tiny")
    return add_tokenizer(directory)


def test_model_info_describes_the_checkpoint(cli, checkpoint: Path) -> None:
    r = cli("model", "info", str(checkpoint), with_home=False)
    assert r.code == 0, r
    assert "Qwen3MoeForCausalLM" in r.stdout
    assert "8 routed, 2 per token" in r.stdout
    info = json.loads(cli("model", "info", str(checkpoint), "--json", with_home=False).stdout)
    loaded = engine.load_model(checkpoint).net
    assert info["total_params"] == sum(p.numel() for p in loaded.parameters())
    experts_per_layer = 8 * 3 * 64 * 32  # E x (gate, up, down) x H x I
    assert info["total_params"] - info["active_params"] == 2 * experts_per_layer * 6 // 8  # 6 of 8 skipped
    assert (info["layers"], info["moe_layers"], info["quantization"]) == (2, 2, None)


def test_model_info_without_a_checkpoint_lists_what_loads(cli, tmp_path: Path) -> None:
    listing = json.loads(cli("model", "info", "--json", with_home=False).stdout)
    for model_type in ("qwen3_moe", "gpt_oss", "qwen3_next", "glm4_moe", "deepseek_v2", "minimax_m2", "olmoe"):
        assert model_type in listing["architectures"]
    assert {"fp8", "mxfp4", "gptq", "awq"} <= set(listing["quant_methods"])
    # An unsupported model_type is refused naming it, with the same list.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_moe"}))
    r = cli("model", "info", str(tmp_path), with_home=False)
    assert r.code == 1 and "no_such_moe" in r.stderr
    assert all(name in " ".join(r.stderr.split()) for name in listing["architectures"])


def test_model_quantize_writes_a_checkpoint_that_loads_directly(cli, checkpoint: Path, tmp_path: Path) -> None:
    dst = tmp_path / "int4"
    r = cli("model", "quantize", str(checkpoint), str(dst), "--scheme", "int4", "--group-size", "32", with_home=False)
    assert r.code == 0, r
    info = json.loads(cli("model", "info", str(dst), "--json", with_home=False).stdout)
    assert info["quantization"]["scheme"] == "int4" and info["quantization"]["group_size"] == 32
    want = engine.load_model(checkpoint, quantize="int4", group_size=32).logits(PROMPT)
    assert torch.equal(engine.load_model(dst).logits(PROMPT), want)
    assert (dst / "tokenizer.json").is_file()


def test_generate_streams_the_answer_and_reports_speed(cli, checkpoint: Path) -> None:
    r = cli("generate", "--model", str(checkpoint), "--no-think", "--max-tokens", "12", "hello world", with_home=False)
    assert r.code == 0, r
    model = engine.load_model(checkpoint)
    messages = [{"role": "user", "content": "hello world"}]
    reply = model.complete(messages, enable_thinking=False, max_new_tokens=12).text
    assert r.stdout.strip() == reply.strip()  # special tokens (<think>, EOS) are not shown
    assert "tok/s" in r.stderr and "tokens in" in r.stderr


def test_generate_quantized_runs(cli, checkpoint: Path) -> None:
    r = cli("generate", "--model", str(checkpoint), "--quantize", "int8", "--max-tokens", "4", "hi", with_home=False)
    assert r.code == 0, r
    assert "4 tokens in" in r.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("generate", "--model", "/nonexistent/model", "hi"), "No checkpoint directory"),
        (("model", "info", "/nonexistent/model"), "No checkpoint directory"),
        (("model", "quantize", "{src}", "{tmp}/q", "--scheme", "int3"), "Unknown quantization scheme"),
    ],
)
def test_engine_errors_are_one_red_line_and_exit_1(
    cli, checkpoint: Path, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    r = cli(*(a.format(src=checkpoint, tmp=tmp_path) for a in args), with_home=False)
    assert r.code == 1, r
    assert r.stderr.startswith("Error:") and message in r.stderr
    assert "Traceback" not in r.stderr


def test_bare_directory_has_no_tokenizer(cli, checkpoint: Path, tmp_path: Path) -> None:
    bare = Path(shutil.copytree(checkpoint, tmp_path / "bare"))
    for name in bare.iterdir():
        if name.name.startswith("tokenizer") or name.name == "chat_template.jinja":
            name.unlink()
    r = cli("generate", "--model", str(bare), "hi", with_home=False)
    assert r.code == 1 and "no tokenizer files" in r.stderr, r
