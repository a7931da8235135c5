"""End-to-end answer evaluation on SQuAD-format data: index the paragraphs, ask the questions.

A question counts as answered when a gold answer appears (SQuAD-normalised: lower case, no
punctuation or articles) in the answer or in its first cited source. Citations are valid when
they name sources that were given; for the extractive generator, also when the cited source
really contains the sentence that cites it.
"""

from __future__ import annotations

import json
import re
import string
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.settings import Settings
from ingest.pipeline import ingest_records

COLLECTION = "squad"
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normalisation."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


@dataclass
class Question:
    id: str
    question: str
    answers: list[str]
    paragraph: str  # the source id of its paragraph


@dataclass
class QaReport:
    questions: int = 0
    answered: int = 0  # gold in answer or first cited source
    gold_in_answer: int = 0
    gold_in_first_cited: int = 0
    paragraph_retrieved: int = 0  # the question's paragraph among the sources
    with_citation: int = 0
    invalid_citations: int = 0  # answers with at least one invalid citation
    first_answer_ms: list[float] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        n = max(self.questions, 1)
        ms = np.array(self.first_answer_ms or [0.0])
        return {
            "questions": self.questions,
            "answered": self.answered / n,
            "gold_in_answer": self.gold_in_answer / n,
            "gold_in_first_cited": self.gold_in_first_cited / n,
            "paragraph_in_sources": self.paragraph_retrieved / n,
            "with_citation": self.with_citation / n,
            "invalid_citation_answers": self.invalid_citations,
            "first_answer_ms_p50": float(np.percentile(ms, 50)),
            "first_answer_ms_p90": float(np.percentile(ms, 90)),
        }


def load_squad(path: Path, *, answerable_only: bool = True) -> tuple[list[tuple[str, str, str]], list[Question]]:
    """(paragraph records (source id, title, text), questions) from a SQuAD v2 JSON file."""
    data = json.loads(Path(path).read_text())
    records, questions = [], []
    for article in data["data"]:
        title = article["title"].replace("_", " ")
        for i, para in enumerate(article["paragraphs"]):
            source = f"squad:{article['title']}:{i}"
            records.append((source, title, para["context"]))
            for qa in para["qas"]:
                if answerable_only and qa.get("is_impossible"):
                    continue
                gold = list(dict.fromkeys(a["text"] for a in qa["answers"]))
                questions.append(Question(qa["id"], qa["question"], gold, source))
    return records, questions


def score(report: QaReport, q: Question, ans: Any) -> None:
    """Add one answered question to the report."""
    report.questions += 1
    gold = [normalize(a) for a in q.answers]
    in_answer = any(g and g in normalize(ans.answer) for g in gold)
    first = ans.sources[ans.citations[0] - 1] if ans.citations else None
    in_first = first is not None and any(g and g in normalize(first.text) for g in gold)
    report.gold_in_answer += in_answer
    report.gold_in_first_cited += in_first
    report.answered += in_answer or in_first
    report.paragraph_retrieved += any(s.source == q.paragraph for s in ans.sources)
    report.with_citation += bool(ans.citations)
    report.invalid_citations += any(w.startswith("The answer cited") for w in ans.warnings) or any(
        not 1 <= c <= len(ans.sources) for c in ans.citations
    )
    report.first_answer_ms.append(ans.timings["first_answer_token_ms"])
    if not (in_answer or in_first):
        report.failures.append({"question": q.question, "gold": q.answers, "answer": ans.answer})


def pick(questions: list[Question], limit: int | None) -> list[Question]:
    """`limit` questions spread evenly over the file (both articles), or all."""
    if not limit:
        return questions
    return questions[:: max(1, len(questions) // limit)][:limit]


def evaluate_answers(squad_file: Path, *, settings: Settings, embedder: Any, limit: int | None = None) -> QaReport:
    """Index the file's paragraphs in a throwaway knowledge base and ask its answerable questions."""
    from app.service import AnswerService
    from retrieval.kb import KnowledgeBase

    records, questions = load_squad(squad_file)
    questions = pick(questions, limit)
    report = QaReport()
    with tempfile.TemporaryDirectory(prefix="moerag-qa-") as tmp:
        s = settings.replace(home=Path(tmp), database_url="", collection=COLLECTION)
        kb = KnowledgeBase(s.home)
        ingest_records(kb, embedder, records, collection=COLLECTION)
        service = AnswerService(s, kb=kb, embedder=embedder)
        service.ask(questions[0].question)  # warm-up: first-call costs are not the steady state
        for q in questions:
            score(report, q, service.ask(q.question))
    return report
