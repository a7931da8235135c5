"""The engine's public model object: full-sequence logits for checks, and generation with a KV
cache (token ids in and out, or text / chat messages in and text deltas out).

Shapes: B batch, T prompt tokens, V vocabulary.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.errors import ContextLengthError, EngineError
from engine.experts import EXPERT_BACKENDS, default_backend
from engine.loader import Dtype, check_dtype, load_checkpoint
from engine.quantization import TARGETS, check_scheme, quantize_modules
from engine.reasoning import is_harmony
from engine.sampling import SamplingParams, choose, penalize_repeats
from engine.stops import StopStrings
from engine.tokenizer import Detokenizer, Message, chat_prompt, load_tokenizer

log = logging.getLogger(__name__)

TokenIds = Sequence[int] | Sequence[Sequence[int]] | torch.Tensor
Prompt = str | Sequence[int] | Sequence[Message]


class Model:
    """A loaded checkpoint; `net` is the architecture's module (forward(tokens, cache, start))."""

    def __init__(
        self,
        net: nn.Module,
        *,
        model_type: str,
        args: Any,
        config: dict[str, Any],
        directory: Path,
        eos_token_ids: tuple[int, ...] = (),
        tokenizer: Any | None = None,
        quantization: dict[str, Any] | None = None,
    ) -> None:
        self.net = net
        self.model_type = model_type
        self.args = args
        self.config = config
        self.directory = directory
        self.eos_token_ids = eos_token_ids  # from generation_config.json, else config.json
        self.tokenizer = tokenizer  # transformers tokenizer from the checkpoint, if it ships one
        self.quantization = quantization  # {"scheme", "group_size", "targets"}, or None for float

    @property
    def device(self) -> torch.device:
        return self.net.model.embed_tokens.weight.device

    @property
    def context_length(self) -> int:
        return int(self.net.max_position_embeddings)

    def set_experts_backend(self, name: str) -> None:
        """Switch every MoE layer to another expert backend from EXPERT_BACKENDS."""
        if name not in EXPERT_BACKENDS:
            raise EngineError(f"Unknown experts backend {name!r}; available: {', '.join(sorted(EXPERT_BACKENDS))}.")
        for module in self.net.modules():
            if hasattr(module, "backend"):  # Experts and its quantized stand-ins
                module.backend = name
        self.net.weights_changed()  # the native decode backend runs only the "cpu" experts itself

    def _batch(self, token_ids: TokenIds) -> tuple[torch.Tensor, bool]:
        """token_ids [T] or [B, T] -> ([B, T] int64 on the model's device, whether it was batched)."""
        tokens = torch.as_tensor(token_ids, dtype=torch.long, device=self.device)
        if tokens.dim() not in (1, 2) or tokens.shape[-1] == 0:
            raise EngineError(f"Expected token ids as [T] or [B, T] with T >= 1, got shape {tuple(tokens.shape)}.")
        vocab = self.net.model.embed_tokens.weight.shape[0]
        if int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
            raise EngineError(f"Token ids must lie in [0, {vocab}); got {int(tokens.min())}..{int(tokens.max())}.")
        return (tokens, True) if tokens.dim() == 2 else (tokens[None], False)

    @torch.inference_mode()
    def logits(self, token_ids: TokenIds) -> torch.Tensor:
        """Logits for every position, fp32: [T, V] for one sequence, [B, T, V] for a batch."""
        tokens, batched = self._batch(token_ids)
        if tokens.shape[1] > self.context_length:
            raise ContextLengthError(
                f"{tokens.shape[1]} tokens exceed the model's context window of {self.context_length}."
            )
        out = self.net(tokens).float()  # [B, T, V]
        return out if batched else out[0]

    def generate(
        self, token_ids: TokenIds, params: SamplingParams | None = None, /, **settings: Any
    ) -> list[int] | list[list[int]]:
        """Decoding with a KV cache: one prefill, then one token per step (greedy by default).

        `params` (or SamplingParams fields as keywords, which override it) sets sampling, length
        and stops. Returns the new tokens only (per sequence for a batch); a sequence stops after
        an EOS id, which is included. Batched prompts must have equal lengths (no padding yet).
        """
        params = (params or SamplingParams()).updated(**settings)
        tokens, batched = self._batch(token_ids)
        eos = self._eos(params)
        steps = list(self._steps(tokens, params))
        generated = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in range(tokens.shape[0])]  # [B, N]
        result = [_cut_at_eos(row, set(eos)) for row in generated]
        return result if batched else result[0]

    def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        /,
        *,
        enable_thinking: bool | None = None,
        reasoning_effort: str | None = None,
        **settings: Any,
    ) -> Iterator[str]:
        """Text deltas of the reply to one prompt (text, token ids or chat messages), as decoded.

        A delta never ends inside a multi-byte character; special tokens (EOS) are not shown, except
        gpt-oss's harmony markers, which engine.reasoning.reply_splitter reads and drops.
        Generation ends at the first of the `stop` strings, which is not shown (nor anything after it).
        """
        steps = self.stream_tokens(
            prompt, params, enable_thinking=enable_thinking, reasoning_effort=reasoning_effort, **settings
        )
        for _, delta in steps:
            if delta:
                yield delta

    def complete(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        /,
        *,
        enable_thinking: bool | None = None,
        reasoning_effort: str | None = None,
        **settings: Any,
    ) -> Completion:
        """The whole reply to one prompt: its token ids and its text (cut before a stop string)."""
        params = (params or SamplingParams()).updated(**settings)
        steps = list(
            self.stream_tokens(prompt, params, enable_thinking=enable_thinking, reasoning_effort=reasoning_effort)
        )
        return Completion(token_ids=[t for t, _ in steps if t is not None], text="".join(d for _, d in steps))

    def stream_tokens(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        /,
        *,
        enable_thinking: bool | None = None,
        reasoning_effort: str | None = None,
        **settings: Any,
    ) -> Iterator[tuple[int | None, str]]:
        """Like `stream`, one item per decode step: (token id, text delta, often ""), then (None, the rest)."""
        params = (params or SamplingParams()).updated(**settings)
        tokenizer = self._need_tokenizer()
        ids = self.prompt_ids(prompt, enable_thinking=enable_thinking, reasoning_effort=reasoning_effort)
        tokens = torch.tensor([ids], device=self.device)
        # harmony (gpt-oss) marks its channels with special tokens: kept, for the reasoning splitter
        detok, stops = Detokenizer(tokenizer, skip_special_tokens=not is_harmony(tokenizer)), StopStrings(params.stop)
        for step in self._steps(tokens, params):
            token = int(step[0])
            yield token, stops.push(detok.push(token))
            if stops.stopped:
                return  # closes _steps: no decode step runs past the stop string
        yield None, stops.push(detok.flush()) + stops.flush()

    def _eos(self, params: SamplingParams) -> tuple[int, ...]:
        return self.eos_token_ids if params.eos_token_ids is None else params.eos_token_ids

    def prompt_ids(
        self, prompt: Prompt, *, enable_thinking: bool | None = None, reasoning_effort: str | None = None
    ) -> list[int]:
        """Token ids for text (encoded), chat messages (chat template) or ids (as given)."""
        if isinstance(prompt, str):
            return list(self._need_tokenizer().encode(prompt))
        items = list(prompt)
        if items and all(isinstance(m, dict) for m in items):
            return chat_prompt(
                self._need_tokenizer(), items, enable_thinking=enable_thinking, reasoning_effort=reasoning_effort
            )
        if enable_thinking is not None or reasoning_effort is not None:
            raise EngineError("enable_thinking and reasoning_effort apply to chat messages, not to token ids.")
        return [int(t) for t in items]

    def _need_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise EngineError(
                f"{self.directory} has no tokenizer files (tokenizer.json ...); pass token ids to generate() "
                "or add the tokenizer files from the original checkpoint."
            )
        return self.tokenizer

    @torch.inference_mode()
    def _steps(self, tokens: torch.Tensor, params: SamplingParams) -> Iterator[torch.Tensor]:
        """Prefill tokens [B, T], then yield the next token ids [B] until every row hit EOS."""
        b, t = tokens.shape
        if t >= self.context_length:
            raise ContextLengthError(
                f"The prompt has {t} tokens but the context window is {self.context_length}; "
                "shorten the prompt (or retrieve fewer sources)."
            )
        max_new_tokens = min(params.max_new_tokens, self.context_length - t)
        if max_new_tokens <= 0:
            return
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        cache = self.net.new_cache(b, t + max_new_tokens)
        eos = torch.tensor(list(self._eos(params)), dtype=torch.long, device=self.device)
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        rows = torch.arange(b, device=self.device)
        vocab = self.net.model.embed_tokens.weight.shape[0]
        seen = torch.zeros((b, vocab), dtype=torch.bool, device=self.device).scatter_(1, tokens, True)  # [B, V]
        logits = self.net(tokens, cache, 0, last_only=True)  # [B, 1, V]
        for step in range(max_new_tokens):
            scores = penalize_repeats(logits[:, -1], seen, params.repetition_penalty)  # [B, V]
            nxt = choose(scores, params, generator)  # [B]
            seen[rows, nxt] = True
            yield nxt
            done |= torch.isin(nxt, eos)
            if bool(done.all()) or step == max_new_tokens - 1:
                return
            logits = self.net(nxt[:, None], cache, t + step, last_only=True)  # [B, 1, V]


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    text: str


def _default_eos(directory: Path, config: dict[str, Any]) -> tuple[int, ...]:
    """EOS ids from generation_config.json (what transformers' generate uses), else config.json."""
    value: Any = config.get("eos_token_id")
    path = directory / "generation_config.json"
    if path.is_file():
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id", value)
        except (OSError, ValueError):
            log.warning("ignoring unreadable %s", path)
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


def _cut_at_eos(row: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in eos:
            return row[: i + 1]
    return row


def load_model(
    path_or_id: str | Path,
    *,
    dtype: Dtype = torch.float32,
    quantize: str | None = None,
    group_size: int = 128,
    device: str | torch.device = "cpu",
    experts_backend: str | None = None,
) -> Model:
    """Load a Hugging Face checkpoint directory (or hub id) into a ready-to-run Model.

    dtype: of the float parameters; a torch dtype or, as transformers takes it, "float32",
    "bfloat16", "float16" or "auto" (the checkpoint's config.json `torch_dtype`, else float32).
    quantize: None, "int8" or "int4" (weight-only; group_size applies to int4). Each decoder layer
    is quantized as soon as it is loaded, so peak memory stays near the quantized size plus one
    float layer. A checkpoint written quantized (write_checkpoint) loads as it is stored.
    """
    check_dtype(dtype)
    transform = None
    quantization = None
    if quantize is not None:
        check_scheme(quantize, group_size=group_size)
        quantization = {"scheme": quantize, "group_size": group_size, "targets": TARGETS}
        transform = partial(quantize_modules, scheme=quantize, group_size=group_size)
    loaded = load_checkpoint(path_or_id, dtype=dtype, device=device, transform=transform)
    if loaded.quantization is not None:
        stored = loaded.quantization
        if quantization is not None and (stored["scheme"], stored["group_size"]) != (quantize, group_size):
            raise EngineError(
                f"{loaded.directory} is already quantized ({stored['scheme']}, group size {stored['group_size']}); "
                "load it without quantize=, or quantize the original checkpoint instead."
            )
        quantization = stored
    model = Model(
        loaded.net,
        model_type=loaded.model_type,
        args=loaded.args,
        config=loaded.config,
        directory=loaded.directory,
        eos_token_ids=_default_eos(loaded.directory, loaded.config),
        tokenizer=load_tokenizer(loaded.directory),
        quantization=quantization,
    )
    model.set_experts_backend(experts_backend or default_backend(model.device))
    log.info("loaded %s from %s (%s, %s)", loaded.model_type, loaded.directory, loaded.dtype, device)
    return model
