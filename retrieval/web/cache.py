"""Fetched pages kept in the SQL store for a while (a TTL), so asking again does not refetch."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import String, Text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from retrieval.errors import StoreError
from retrieval.store import Store


class _Base(DeclarativeBase):
    pass


class PageRow(_Base):
    __tablename__ = "web_pages"

    url: Mapped[str] = mapped_column(String(4000), primary_key=True)
    final_url: Mapped[str] = mapped_column(String(4000))
    title: Mapped[str] = mapped_column(Text, default="")
    date: Mapped[str | None] = mapped_column(String(40), default=None)
    text: Mapped[str] = mapped_column(Text)
    content_type: Mapped[str] = mapped_column(String(100))
    fetched_at: Mapped[float]  # unix time


@dataclass
class CachedPage:
    url: str
    final_url: str
    title: str
    date: str | None
    text: str
    content_type: str
    fetched_at: float


class PageCache:
    def __init__(self, store: Store, *, ttl: float) -> None:
        self.store, self.ttl = store, ttl
        try:
            _Base.metadata.create_all(store.engine)
        except SQLAlchemyError as exc:
            raise StoreError(f"Cannot create the web page cache in {store.url}: {exc}") from exc

    def get(self, url: str) -> CachedPage | None:
        """The cached page if it is younger than the TTL."""
        with self.store.session() as session:
            row = session.get(PageRow, url)
            if row is None or time.time() - row.fetched_at > self.ttl:
                return None
            return CachedPage(row.url, row.final_url, row.title, row.date, row.text, row.content_type, row.fetched_at)

    def put(self, page: CachedPage) -> None:
        with self.store.session() as session:
            session.merge(PageRow(**page.__dict__))
