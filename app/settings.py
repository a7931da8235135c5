"""One settings object. Each field maps one-to-one onto an env var MOERAG_<FIELD> and a key of
the optional TOML file (MOERAG_CONFIG, else <home>/config.toml). Precedence: CLI flag > env var >
TOML file > default.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from retrieval.errors import MoeragError


class SettingsError(MoeragError):
    """A setting has a value moerag cannot use."""


@dataclass(frozen=True)
class Settings:
    home: Path = Path.home() / ".moerag"  # data directory: database, index files, lock
    database_url: str = ""  # SQLAlchemy URL; empty: SQLite file <home>/moerag.db
    collection: str = "default"
    embed_model: str = "all-MiniLM-L6-v2"  # any sentence-transformers name or path
    chunk_tokens: int = 256  # target chunk size, embedder tokens (capped at the model's limit)
    chunk_overlap: int = 32  # tokens shared by consecutive chunks of a section
    max_file_mb: float = 50.0  # larger files are skipped with a reason
    exact_index_max: int = 100_000  # chunks; above this the FAISS index is approximate (IVF)
    nprobe: int = 32  # IVF lists searched per query
    search_k: int = 10
    search_mode: str = "hybrid"  # hybrid | dense | bm25

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'moerag.db'}"

    def replace(self, **changes) -> Settings:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def _coerce(name: str, kind, raw):
    try:
        if kind in (Path, "Path"):
            return Path(str(raw)).expanduser()
        if kind in (int, "int"):
            return int(raw)
        if kind in (float, "float"):
            return float(raw)
        return str(raw)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"Setting '{name}' (MOERAG_{name.upper()}) must be a {kind}, got {raw!r}") from exc


def load_settings(*, home: Path | None = None, env: dict[str, str] | None = None) -> Settings:
    """Defaults, then the TOML file, then MOERAG_* variables; `home` (the --home flag) wins."""
    env = dict(os.environ if env is None else env)
    types = {f.name: f.type for f in fields(Settings)}
    values: dict = {}
    home = Path(home).expanduser() if home else Path(env["MOERAG_HOME"]).expanduser() if env.get("MOERAG_HOME") else None
    config = Path(env["MOERAG_CONFIG"]) if env.get("MOERAG_CONFIG") else (home or Settings.home) / "config.toml"
    if config.is_file():
        try:
            data = tomllib.loads(config.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"Cannot read the settings file {config}: {exc}") from exc
        unknown = set(data) - set(types)
        if unknown:
            raise SettingsError(f"Unknown settings in {config}: {', '.join(sorted(unknown))}. Known: {', '.join(types)}")
        values.update({k: _coerce(k, types[k], v) for k, v in data.items()})
    for name, kind in types.items():
        raw = env.get(f"MOERAG_{name.upper()}")
        if raw is not None and raw != "":
            values[name] = _coerce(name, kind, raw)
    if home is not None:
        values["home"] = home
    settings = Settings(**values)
    if settings.search_mode not in ("hybrid", "dense", "bm25"):
        raise SettingsError(f"MOERAG_SEARCH_MODE must be hybrid, dense or bm25 (got {settings.search_mode!r})")
    if settings.chunk_overlap >= settings.chunk_tokens:
        raise SettingsError("MOERAG_CHUNK_OVERLAP must be smaller than MOERAG_CHUNK_TOKENS")
    return settings
