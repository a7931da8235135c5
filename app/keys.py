"""API keys for the HTTP API: created once, stored hashed, scoped to collections, revocable.

A key is 32 random bytes (url-safe base64) behind the prefix `mrg_`. Only its SHA-256 is
stored: with that much entropy a slow password hash adds nothing, and lookups stay one indexed
query. The plaintext exists once, in what `create` returns. Searching the live web is a
permission of its own (`web`, off by default), so a widget's key cannot make the server fetch pages.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import String, Text, false, inspect, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from retrieval.errors import MoeragError, NotFoundError, StoreError
from retrieval.store import Store

PREFIX = "mrg_"


def _now() -> datetime:
    return datetime.now(timezone.utc)


class ApiKeyError(MoeragError):
    """A key cannot be created as asked."""


class _Base(DeclarativeBase):
    pass


class KeyRow(_Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    digest: Mapped[str] = mapped_column(String(64), unique=True, index=True)  # sha256 of the whole key
    hint: Mapped[str] = mapped_column(String(16))  # the first characters, to tell keys apart in lists
    collections: Mapped[str] = mapped_column(Text, default="[]")  # JSON list; empty: every collection
    read_only: Mapped[bool] = mapped_column(default=False)
    web: Mapped[bool] = mapped_column(default=False, server_default=false())  # may search the live web
    created_at: Mapped[datetime] = mapped_column(default=_now)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


@dataclass(frozen=True)
class ApiKey:
    id: int
    name: str
    hint: str
    collections: tuple[str, ...]  # empty: all
    read_only: bool
    created_at: datetime
    revoked: bool
    web: bool = False  # may ask for live web results

    def may_read(self, collection: str) -> bool:
        return not self.collections or collection in self.collections

    def may_write(self, collection: str) -> bool:
        return not self.read_only and self.may_read(collection)


def _key(row: KeyRow) -> ApiKey:
    return ApiKey(row.id, row.name, row.hint, tuple(json.loads(row.collections or "[]")), row.read_only,
                  row.created_at, row.revoked_at is not None, bool(row.web))


def _add_missing_columns(store: Store) -> None:
    """Databases made before a column existed get it (with its default) when they are opened."""
    present = {c["name"] for c in inspect(store.engine).get_columns(KeyRow.__tablename__)}
    if "web" in present:
        return
    try:
        with store.engine.begin() as conn:
            conn.execute(text(f"ALTER TABLE {KeyRow.__tablename__} ADD COLUMN web BOOLEAN NOT NULL DEFAULT FALSE"))
    except SQLAlchemyError:
        # Another process may have added it in the meantime; anything else is a real failure.
        if "web" not in {c["name"] for c in inspect(store.engine).get_columns(KeyRow.__tablename__)}:
            raise


def digest(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


class Keys:
    def __init__(self, store: Store) -> None:
        self.store = store
        try:
            _Base.metadata.create_all(store.engine)
            _add_missing_columns(store)
        except SQLAlchemyError as exc:
            raise StoreError(f"Cannot create the API key table in {store.url}: {exc}") from exc

    def create(self, name: str, *, collections: list[str] | tuple[str, ...] = (), read_only: bool = False,
               web: bool = False) -> tuple[ApiKey, str]:
        """(the stored key, its plaintext: shown once, never stored)."""
        if not name.strip():
            raise ApiKeyError("A key needs a name (--name), e.g. the tool that will use it.")
        plaintext = PREFIX + secrets.token_urlsafe(32)
        with self.store.session() as session:
            row = KeyRow(name=name.strip(), digest=digest(plaintext), hint=plaintext[:10],
                         collections=json.dumps(sorted(set(collections))), read_only=read_only, web=web)
            session.add(row)
            session.flush()
            return _key(row), plaintext

    def list(self) -> list[ApiKey]:
        with self.store.session() as session:
            return [_key(r) for r in session.scalars(select(KeyRow).order_by(KeyRow.id))]

    def revoke(self, ident: str) -> ApiKey:
        """Revoke by id or by name (a name must be unambiguous)."""
        with self.store.session() as session:
            # isascii: "²" passes str.isdigit() but not int(); 18 digits: SQL integers are 64-bit
            if ident.isascii() and ident.isdigit() and len(ident) <= 18:
                rows = [r for r in [session.get(KeyRow, int(ident))] if r is not None]
            else:
                rows = list(session.scalars(select(KeyRow).where(KeyRow.name == ident, KeyRow.revoked_at.is_(None))))
            if not rows:
                raise NotFoundError(f"No API key '{ident}'. List them with: moerag keys list")
            if len(rows) > 1:
                raise ApiKeyError(f"{len(rows)} active keys are named '{ident}'; revoke one by id (moerag keys list).")
            rows[0].revoked_at = rows[0].revoked_at or _now()
            return _key(rows[0])

    def verify(self, plaintext: str) -> ApiKey | None:
        """The active key with this plaintext, or None."""
        if not plaintext.startswith(PREFIX):
            return None
        with self.store.session() as session:
            row = session.scalar(select(KeyRow).where(KeyRow.digest == digest(plaintext)))
            if row is None or row.revoked_at is not None:
                return None
            return _key(row)
