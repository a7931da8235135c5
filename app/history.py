"""Conversations and their messages (with the sources each answer used), in the SQL store.

Tables of their own, created on the knowledge base's database next to collections and chunks,
so one file (or one PostgreSQL database) holds a team's documents and its chat history.
Callers get plain dataclasses, never ORM rows, so nothing outlives its session.
An answer that was stopped (client gone, Ctrl-C, a failure) is stored as far as it got, marked
`stopped`, so every question keeps its answer row and the turns stay paired.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import ForeignKey, String, Text, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from retrieval.errors import NotFoundError, StoreError
from retrieval.store import Store

TITLE_CHARS = 80


def _now() -> datetime:
    return datetime.now(timezone.utc)


class _Base(DeclarativeBase):
    pass


class ConversationRow(_Base):
    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(TITLE_CHARS * 4), default="")
    collections: Mapped[str] = mapped_column(Text, default="[]")  # JSON list of names
    created_at: Mapped[datetime] = mapped_column(default=_now)
    updated_at: Mapped[datetime] = mapped_column(default=_now, index=True)

    messages: Mapped[list[MessageRow]] = relationship(
        back_populates="conversation", cascade="all, delete-orphan", passive_deletes=True, order_by="MessageRow.id"
    )


class MessageRow(_Base):
    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))  # user | assistant
    content: Mapped[str] = mapped_column(Text)
    reasoning: Mapped[str] = mapped_column(Text, default="")
    details: Mapped[str] = mapped_column(Text, default="{}")  # JSON: sources, citations, warnings, timings, stopped
    created_at: Mapped[datetime] = mapped_column(default=_now)

    conversation: Mapped[ConversationRow] = relationship(back_populates="messages")


@dataclass
class Message:
    id: int
    role: str
    content: str
    reasoning: str = ""
    sources: list[dict[str, Any]] = field(default_factory=list)
    citations: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    stopped: bool = False  # the answer was cut short; `content` is what was written until then


@dataclass
class Conversation:
    id: int
    title: str
    collections: list[str]
    created_at: datetime
    updated_at: datetime
    messages: list[Message] = field(default_factory=list)

    def history(self) -> list[dict[str, str]]:
        """The turns as chat messages (answers without their reasoning), oldest first."""
        return [{"role": m.role, "content": m.content} for m in self.messages]


def _conversation(row: ConversationRow, *, with_messages: bool) -> Conversation:
    conv = Conversation(row.id, row.title, json.loads(row.collections or "[]"), row.created_at, row.updated_at)
    if with_messages:
        for m in row.messages:
            d = json.loads(m.details or "{}")
            conv.messages.append(
                Message(m.id, m.role, m.content, m.reasoning, d.get("sources", []), d.get("citations", []),
                        d.get("warnings", []), d.get("timings", {}), bool(d.get("stopped", False)))
            )
    return conv


def title_from(question: str) -> str:
    words = " ".join(question.split())
    return words if len(words) <= TITLE_CHARS else words[: TITLE_CHARS - 1].rsplit(" ", 1)[0] + "…"


class Conversations:
    """Create, list, resume, rename and delete conversations; append messages."""

    def __init__(self, store: Store) -> None:
        self.store = store
        try:
            _Base.metadata.create_all(store.engine)
        except SQLAlchemyError as exc:
            raise StoreError(f"Cannot create the conversation tables in {store.url}: {exc}") from exc

    def create(self, *, title: str = "", collections: list[str] | tuple[str, ...] = ()) -> Conversation:
        with self.store.session() as session:
            row = ConversationRow(title=title_from(title), collections=json.dumps(list(collections)))
            session.add(row)
            session.flush()
            return _conversation(row, with_messages=False)

    def list(self, *, limit: int = 100) -> list[Conversation]:
        """Most recently active first."""
        with self.store.session() as session:
            rows = session.scalars(select(ConversationRow).order_by(ConversationRow.updated_at.desc(), ConversationRow.id.desc()).limit(limit))
            return [_conversation(r, with_messages=False) for r in rows]

    def get(self, conversation_id: int) -> Conversation:
        with self.store.session() as session:
            return _conversation(self._row(session, conversation_id), with_messages=True)

    def rename(self, conversation_id: int, title: str) -> None:
        if not title.strip():
            raise StoreError("A conversation title cannot be empty.")
        with self.store.session() as session:
            self._row(session, conversation_id).title = title_from(title)

    def delete(self, conversation_id: int) -> None:
        with self.store.session() as session:
            session.delete(self._row(session, conversation_id))

    def add(
        self,
        conversation_id: int,
        role: str,
        content: str,
        *,
        reasoning: str = "",
        sources: list[dict[str, Any]] | None = None,
        citations: list[int] | None = None,
        warnings: list[str] | None = None,
        timings: dict[str, float] | None = None,
        stopped: bool = False,
    ) -> int:
        details = {"sources": sources or [], "citations": citations or [], "warnings": warnings or [], "timings": timings or {}}
        if stopped:
            details["stopped"] = True
        with self.store.session() as session:
            conv = self._row(session, conversation_id)
            if not conv.title and role == "user":
                conv.title = title_from(content)
            conv.updated_at = _now()
            row = MessageRow(conversation_id=conv.id, role=role, content=content, reasoning=reasoning, details=json.dumps(details))
            session.add(row)
            session.flush()
            return row.id

    @staticmethod
    def _row(session, conversation_id: int) -> ConversationRow:
        row = session.get(ConversationRow, conversation_id)
        if row is None:
            raise NotFoundError(f"No conversation with id {conversation_id}. List them with: moerag conversations list")
        return row
