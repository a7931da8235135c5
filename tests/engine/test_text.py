"""Text in, text out: tokenizer loading, chat templates, streaming detokenization, <think> splitting."""

from __future__ import annotations

import random

import pytest

import engine
from engine.reasoning import Piece, split_reasoning
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
