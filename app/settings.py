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
from retrieval.search import MODES


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
    lock_wait: float = 30.0  # seconds a write (ingest batch, upload, delete) waits for another writer
    # Parsing limits: each file is parsed in a worker process under these; one over a limit fails alone
    parse_timeout: float = 60.0  # seconds of wall time per file
    parse_memory_mb: int = 2048  # address space of the parsing worker
    max_unpacked_mb: float = 200.0  # zip-based formats (docx): members' total uncompressed size
    max_text_mb: float = 20.0  # extracted text per file (characters, in millions x 1.048576)
    max_elements: int = 1_000_000  # pages, paragraphs, rows, table cells or JSON values per file
    exact_index_max: int = 100_000  # chunks; above this the FAISS index is approximate (IVF)
    nprobe: int = 32  # IVF lists searched per query
    search_k: int = 10
    search_mode: str = "hybrid"  # one of retrieval.search.MODES: hybrid | dense | bm25
    # Answering (`moerag ask`, the UI, the API)
    generator: str = ""  # extractive | engine | openai; empty: engine if `model` is set, openai if a URL is, else extractive
    model: str = ""  # the engine's checkpoint: a local directory, a .gguf file or a Hugging Face hub id
    quantize: str = ""  # "", int8 or int4: applied to the engine's model while it loads
    device: str = "cpu"  # the engine's torch device: cpu, cuda, cuda:1 ...
    openai_base_url: str = ""  # an OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama), e.g. http://gpu1:8000/v1
    openai_model: str = ""  # the model name that server serves
    openai_api_key: str = ""  # sent as a bearer token; most self-hosted servers accept anything
    context_window: int = 0  # tokens; 0: the model's own (8192 for an OpenAI-compatible server)
    answer_tokens: int = 2048  # new tokens at most per answer, reasoning included
    temperature: float = 0.6  # 0 = greedy; 0.6 is what DeepSeek-R1 and Qwen3 recommend for thinking
    answer_k: int = 8  # sources retrieved per question (fewer when they do not fit the context)
    # Live web search (`--web`, the UI's toggle)
    web_provider: str = "duckduckgo"  # duckduckgo | searxng | none
    searxng_url: str = ""  # a self-hosted SearXNG, e.g. http://searx.intranet:8080 (its JSON API must be on)
    web_region: str = "us-en"  # DuckDuckGo region code (wt-wt: none); passed to SearXNG as its language
    web_safesearch: str = "moderate"  # on | moderate | off
    web_max_results: int = 5  # search results fetched per question
    web_timeout: float = 8.0  # seconds for the whole web step: search, fetches and extraction
    web_page_timeout: float = 4.0  # seconds for one page (all its redirects)
    web_max_page_mb: float = 2.0  # larger pages are cut off and their partial text used
    web_allowlist: str = ""  # comma-separated hosts and CIDRs allowed despite the private-address guard
    web_cache_ttl: float = 86400.0  # seconds a fetched page is reused from the cache
    # The HTTP API (`moerag serve`)
    api_cors_origins: str = ""  # comma-separated origins allowed to call the API from a browser (the widget's pages)
    api_max_files: int = 20  # files per upload request
    api_max_body_mb: float = 4.0  # JSON request bodies; larger ones get 413 before they are read
    api_max_upload_mb: float = 200.0  # a whole multipart upload request (each file also under max_file_mb)
    api_max_collections: int = 16  # collections one chat request may search (duplicates removed first)
    api_max_messages: int = 200  # messages in one chat request
    api_max_chars: int = 100_000  # characters of all messages of one chat request together
    api_max_embed_inputs: int = 256  # texts per embeddings request
    api_max_embed_chars: int = 32_000  # characters of all texts of one embeddings request together (~2 s of CPU here)
    api_max_tokens: int = 8192  # the most `max_tokens` a request may ask for
    api_rate_per_minute: int = 120  # requests per key per minute (0: no limit); over it: 429 with Retry-After
    api_max_concurrent: int = 4  # requests one key may have in flight at once (0: no limit)
    # The chat UI (`moerag ui`)
    ui_password: str = ""  # required to open the UI; `moerag ui --host` off loopback refuses to start without it
    ui_collections: str = ""  # comma-separated collections a UI user may see; empty: all
    ui_read_only: bool = False  # UI users may not upload or delete documents

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
        if kind in (bool, "bool"):
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
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
    if settings.search_mode not in MODES:
        raise SettingsError(f"MOERAG_SEARCH_MODE must be {', '.join(MODES[:-1])} or {MODES[-1]} (got {settings.search_mode!r})")
    if settings.generator not in ("", "extractive", "engine", "openai"):
        raise SettingsError(f"MOERAG_GENERATOR must be extractive, engine or openai (got {settings.generator!r})")
    if settings.web_provider not in ("duckduckgo", "searxng", "none"):
        raise SettingsError(f"MOERAG_WEB_PROVIDER must be duckduckgo, searxng or none (got {settings.web_provider!r})")
    if settings.quantize not in ("", "int8", "int4"):
        raise SettingsError(f"MOERAG_QUANTIZE must be empty, int8 or int4 (got {settings.quantize!r})")
    if settings.chunk_overlap >= settings.chunk_tokens:
        raise SettingsError("MOERAG_CHUNK_OVERLAP must be smaller than MOERAG_CHUNK_TOKENS")
    return settings
