"""The engine preview: `moerag model info` and `quantize` on a checkpoint, and `moerag generate`
from one.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from app.cli.common import JsonOpt, err, out

commands = typer.Typer()


class Effort(str, Enum):
    low = "low"
    medium = "medium"
    high = "high"

group = typer.Typer(no_args_is_help=True, help="Inspect and quantize local MoE checkpoints (engine preview).")


@group.command("info")
def model_info(
    path: Annotated[
        str | None,
        typer.Argument(
            help="Checkpoint directory (config.json + *.safetensors), .gguf file or hub id; "
            "none: list the architectures and formats the engine loads."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Architecture, parameter counts, experts, layers, context, dtype and quantization of a checkpoint."""
    from engine.info import describe, supported

    if path is None:
        listing = supported()
        if as_json:
            print(json.dumps(listing, indent=2))
            return
        for key, values in listing.items():
            out.print(f"[bold]{key}[/]: {escape(', '.join(values))}")
        return
    info = describe(path)
    rows = {
        "directory": str(info.directory),
        "architecture": f"{info.architecture} ({info.model_type})",
        "parameters": f"{info.total_params / 1e9:.3f} B total, {info.active_params / 1e9:.3f} B active per token",
        "layers": f"{info.layers} ({info.moe_layers} MoE)",
        "experts": f"{info.experts} routed, {info.experts_per_token} per token" if info.experts else "none (dense)",
        "hidden / vocab": f"{info.hidden_size} / {info.vocab_size}",
        "context": f"{info.context_length} tokens",
        "dtype": info.dtype,
        "format": f"{info.weight_format}, {info.bits_per_weight:.2f} bits per weight",
        "quantization": "none",
        "on disk": f"{info.checkpoint_bytes / 2**30:.2f} GiB",
    }
    if info.quantization:
        rows["quantization"] = f"{info.quantization['scheme']} (group size {info.quantization['group_size']})"
    if as_json:
        fields = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(info).items()}
        if fields["quantization"]:
            fields["quantization"] = {**fields["quantization"], "targets": list(fields["quantization"]["targets"])}
        print(json.dumps(fields, indent=2))
        return
    table = Table(show_header=False, box=None)
    for key, value in rows.items():
        table.add_row(f"[bold]{key}[/]", escape(value))
    out.print(table)


@group.command("quantize")
def model_quantize(
    src: Annotated[str, typer.Argument(help="Checkpoint directory, .gguf file or hub id to quantize.")],
    dst: Annotated[Path, typer.Argument(help="New directory for the quantized checkpoint.")],
    scheme: Annotated[str, typer.Option("--scheme", help="int4 (group-wise) or int8 (per channel).")] = "int4",
    group_size: Annotated[int, typer.Option("--group-size", help="int4 inputs per scale: 32, 64, 128 or 256.")] = 128,
) -> None:
    """Write a weight-only quantized safetensors checkpoint that loads directly (layer by layer, low memory)."""
    import time

    from engine.export import quantize_checkpoint

    start = time.perf_counter()
    quantize_checkpoint(src, dst, scheme=scheme, group_size=group_size)
    size = sum(p.stat().st_size for p in dst.glob("*.safetensors"))
    out.print(f"Wrote {escape(str(dst))} ({scheme}, {size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s.")


@commands.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The question or instruction.")],
    model: Annotated[str, typer.Option("--model", help="Checkpoint directory, .gguf file or hub id.")],
    quantize: Annotated[str | None, typer.Option("--quantize", help="int8 or int4, applied while loading.")] = None,
    think: Annotated[
        bool | None, typer.Option("--think/--no-think", help="Qwen3's thinking switch (default: the template's).")
    ] = None,
    reasoning_effort: Annotated[
        Effort | None, typer.Option("--reasoning-effort", help="gpt-oss's switch (default: the template's).")
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="New tokens at most.")] = 512,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy.")] = 0.0,
    seed: Annotated[int | None, typer.Option("--seed", help="Sampling seed.")] = None,
) -> None:
    """Stream a reply from a local model: reasoning dimmed, then the answer, then tokens/s."""
    import time

    import torch

    from engine import SamplingParams, load_model
    from engine.reasoning import reply_splitter

    dtype = torch.float32 if quantize is None else torch.bfloat16  # the int kernels are fast with bf16
    llm = load_model(model, dtype=dtype, quantize=quantize)
    chat = getattr(llm.tokenizer, "chat_template", None) is not None
    messages = [{"role": "user", "content": prompt}]
    effort = reasoning_effort.value if reasoning_effort else None
    ids = llm.prompt_ids(messages, enable_thinking=think, reasoning_effort=effort) if chat else llm.prompt_ids(prompt)
    splitter = reply_splitter(llm.tokenizer, llm.tokenizer.decode(ids))
    sampling = SamplingParams(temperature=temperature, seed=seed, max_new_tokens=max_tokens)
    tokens, start, first = 0, time.perf_counter(), None
    for token, delta in llm.stream_tokens(ids, sampling):
        if token is not None:
            tokens += 1
            first = first or time.perf_counter()
        for piece in splitter.feed(delta):
            out.print(escape(piece.text), style="dim" if piece.kind == "reasoning" else None, end="")
    for piece in splitter.close():
        out.print(escape(piece.text), style="dim" if piece.kind == "reasoning" else None, end="")
    end = time.perf_counter()
    decode = f"{(tokens - 1) / (end - first):.2f} tok/s decode" if first and tokens > 1 and end > first else "-"
    out.print()
    first_s = (first or end) - start
    err.print(f"[dim]{tokens} tokens in {end - start:.1f} s · {decode} · first token {first_s:.2f} s[/]")
