"""Text in, text out: tokenizer loading, chat templates, streaming detokenization, reasoning splitting."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

import engine
from engine.reasoning import HarmonySplitter, Piece, ReasoningSplitter, reply_splitter, split_reasoning
from engine.tokenizer import Detokenizer

MESSAGES = [{"role": "user", "content": "héllo wörld 世界 🙂"}]


def test_chat_prompt_uses_template_and_thinking_switch(chat_checkpoint) -> None:
    model = engine.load_model(chat_checkpoint)
    tok = model.tokenizer
    thinking = tok.decode(model.prompt_ids(MESSAGES))
    assert thinking.startswith("<|im_start|>user\nhéllo wörld 世界 🙂<|im_end|>")
    assert thinking.endswith("<|im_start|>assistant\n")
    quiet = tok.decode(model.prompt_ids(MESSAGES, enable_thinking=False))
    assert quiet.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_stream_joins_to_the_decoded_completion(chat_checkpoint) -> None:
    model = engine.load_model(chat_checkpoint)
    done = model.complete(MESSAGES, max_new_tokens=24, eos_token_ids=())
    assert done.token_ids == model.generate(model.prompt_ids(MESSAGES), max_new_tokens=24, eos_token_ids=())
    deltas = list(model.stream(MESSAGES, max_new_tokens=24, eos_token_ids=()))
    assert "".join(deltas) == done.text
    assert all(deltas)


def test_text_prompt_and_missing_tokenizer(chat_checkpoint, tiny_checkpoint) -> None:
    model = engine.load_model(chat_checkpoint)
    assert model.prompt_ids("hello world") == model.tokenizer.encode("hello world")
    _, bare = tiny_checkpoint("qwen3_moe")
    with pytest.raises(engine.EngineError, match="no tokenizer files"):
        list(engine.load_model(bare).stream("hello"))


def test_detokenizer_never_emits_half_characters(chat_checkpoint) -> None:
    tok = engine.load_model(chat_checkpoint).tokenizer
    text = "naïve café — 世界 🙂 done"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > len(text)  # multi-byte characters are split over several byte tokens
    detok = Detokenizer(tok)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


def _join(pieces: list[Piece]) -> dict[str, str]:
    out = {"reasoning": "", "answer": ""}
    for piece in pieces:
        out[piece.kind] += piece.text
    return out


@pytest.mark.parametrize("seed", range(6))
def test_reasoning_split_survives_any_chunking(seed: int) -> None:
    text = "\n<think>\nLet me check [1] and </thi n k> [2].\n</think>\n\nThe answer is 42 [1]."
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), 12))
    deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    got = _join(list(split_reasoning(deltas)))
    assert got == {"reasoning": "\nLet me check [1] and </thi n k> [2].\n", "answer": "The answer is 42 [1]."}


def test_reasoning_opened_by_the_prompt() -> None:
    # DeepSeek-R1's template ends the prompt with "<think>\n": the reply starts inside it.
    got = _join(list(split_reasoning(["Thinking ", "hard</th", "ink>Yes."], starts_in_reasoning=True)))
    assert got == {"reasoning": "Thinking hard", "answer": "Yes."}


def test_no_reasoning_block_is_all_answer() -> None:
    got = _join(list(split_reasoning(["  <thin", "gs> are fine"])))
    assert got == {"reasoning": "", "answer": "<things> are fine"}
    assert _join(list(split_reasoning(["Plain ", "answer."]))) == {"reasoning": "", "answer": "Plain answer."}


@pytest.mark.parametrize("seed", range(20))
def test_stop_strings_cut_the_stream_wherever_the_deltas_split(seed: int) -> None:
    from engine.stops import StopStrings

    rng = random.Random(seed)
    text = "The answer is 42.\nObservation: ignored\nmore"
    cuts = sorted(rng.sample(range(1, len(text)), 8))
    deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    stops = StopStrings(["\nObservation:", "never", "ans wer"])
    shown = [stops.push(d) for d in deltas] + [stops.flush()]
    assert "".join(shown) == "The answer is 42."
    assert stops.stopped
    quiet = StopStrings(["zzz"])
    assert "".join([quiet.push(d) for d in deltas] + [quiet.flush()]) == text


def test_stream_stops_before_a_stop_string(chat_checkpoint) -> None:
    model = engine.load_model(chat_checkpoint)
    full = model.complete(MESSAGES, max_new_tokens=24, eos_token_ids=())
    assert len(full.text) > 6
    stop = full.text[3:6]  # a stop string that occurs in the greedy reply
    cut = full.text[: full.text.index(stop)]
    streamed = "".join(model.stream(MESSAGES, max_new_tokens=24, eos_token_ids=(), stop=[stop]))
    assert streamed == cut
    done = model.complete(MESSAGES, max_new_tokens=24, eos_token_ids=(), stop=[stop])
    assert done.text == cut
    assert len(done.token_ids) < len(full.token_ids)  # decoding ended at the stop string
    assert done.token_ids == full.token_ids[: len(done.token_ids)]


_HARMONY = (
    "<|channel|>analysis<|message|>User asks about [1]; check <|end|> handling.<|end|>"
    '<|start|>assistant<|channel|>commentary to=functions.search <|constrain|>json<|message|>{"q": 1}<|call|>'
    "<|start|>assistant<|channel|>final<|message|>\n The answer is 42 [1].<|return|>"
)


def _harmony(deltas: list[str]) -> dict[str, str]:
    splitter = HarmonySplitter()
    pieces = [p for d in deltas for p in splitter.feed(d)] + splitter.close()
    return _join(pieces)


@pytest.mark.parametrize("seed", range(6))
def test_harmony_channels_split_under_any_chunking(seed: int) -> None:
    # gpt-oss: analysis is the reasoning, final the answer, a tool call's commentary is not shown;
    # markers (special tokens, decoded as text) may be cut anywhere between deltas.
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(_HARMONY)), 20))
    deltas = [_HARMONY[a:b] for a, b in zip([0, *cuts], [*cuts, len(_HARMONY)], strict=True)]
    assert _harmony(deltas) == {"reasoning": "User asks about [1]; check ", "answer": "The answer is 42 [1]."}


def test_harmony_cut_off_mid_message_keeps_what_came() -> None:
    # max_tokens reached inside the analysis: what was reasoned so far is kept, no answer invented.
    assert _harmony(["<|channel|>analysis<|mess", "age|>Still thinking"]) == {
        "reasoning": "Still thinking",
        "answer": "",
    }
    assert _harmony(["Plain text with no channels."]) == {"reasoning": "", "answer": "Plain text with no channels."}


def test_the_splitter_follows_the_tokenizer(chat_checkpoint) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(chat_checkpoint))
    assert isinstance(reply_splitter(tokenizer, "hi <think>"), ReasoningSplitter)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|channel|>", "<|message|>", "<|end|>"]})
    assert isinstance(reply_splitter(tokenizer, "hi"), HarmonySplitter)


_HARMONY_TEMPLATE = (
    "<|start|>system<|message|>Reasoning: {{ reasoning_effort | default('medium') }}<|end|>"
    "{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant{% endif %}"
)


def test_a_harmony_model_takes_reasoning_effort_and_streams_its_markers(chat_checkpoint, tmp_path) -> None:
    # A gpt-oss-style tokenizer (harmony special tokens, reasoning_effort in the template): the
    # switch reaches the template, and streamed text keeps the channel markers the splitter reads.
    from transformers import AutoTokenizer

    directory = Path(shutil.copytree(chat_checkpoint, tmp_path / "harmony"))
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    markers = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": markers})
    tokenizer.chat_template = _HARMONY_TEMPLATE
    tokenizer.save_pretrained(str(directory))
    model = engine.load_model(directory)
    messages = [{"role": "user", "content": "hi"}]
    assert "Reasoning: high" in model.tokenizer.decode(model.prompt_ids(messages, reasoning_effort="high"))
    assert "Reasoning: medium" in model.tokenizer.decode(model.prompt_ids(messages))
    # The tiny model's weights are random: swap two rows of the head so that its first greedy token
    # becomes the channel marker.
    channel = model.tokenizer.convert_tokens_to_ids("<|channel|>")
    first = model.generate(model.prompt_ids(messages), max_new_tokens=1, eos_token_ids=())[0]
    with torch.no_grad():
        head = model.net.lm_head.weight
        head[[first, channel]] = head[[channel, first]]
    model.net.weights_changed()
    text = "".join(model.stream(messages, max_new_tokens=3, eos_token_ids=()))
    assert text.startswith("<|channel|>")
