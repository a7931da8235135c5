"""Who may open the chat UI (`moerag ui`) and what they may see there.

`moerag ui` refuses an address beyond this machine unless a sign-in is configured: the UI password
(MOERAG_UI_PASSWORD) or Streamlit's OIDC login (an [auth] section in a secrets.toml). Inside the
UI, a session sees only the collections of its scope (MOERAG_UI_COLLECTIONS), and a read-only UI
(MOERAG_UI_READ_ONLY) neither adds nor deletes documents; both are checked where the work is done.
"""

from __future__ import annotations

import hmac
import importlib.util
import ipaddress
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from app.settings import Settings
from retrieval.errors import MoeragError

# Set by `moerag ui` when it binds beyond loopback: the page then fails closed if it finds no
# sign-in configured, even where the command's own check and Streamlit's view of secrets differ.
REQUIRE_AUTH_ENV = "MOERAG_UI_REQUIRE_AUTH"


class ScopeError(MoeragError):
    """A UI action outside what this UI may do (a collection out of scope, a write when read-only)."""


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach: 127.0.0.0/8, ::1 and localhost."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def secrets_files(script: Path, *, cwd: Path | None = None, user_home: Path | None = None) -> list[Path]:
    """Where Streamlit looks for secrets.toml by default, lowest precedence first: the user's,
    the project's (current directory) and the script's own folder."""
    cwd = cwd or Path.cwd()
    user_home = user_home or Path.home()
    paths = [user_home / ".streamlit" / "secrets.toml", cwd / ".streamlit" / "secrets.toml",
             script.parent / ".streamlit" / "secrets.toml"]
    return list(dict.fromkeys(p.resolve() for p in paths))


def auth_section(paths: Iterable[Path]) -> dict:
    """The [auth] table Streamlit would read from these files (later files win, as in Streamlit);
    empty when there is none or a file cannot be read."""
    merged: dict = {}
    for path in paths:
        try:
            merged.update(tomllib.loads(path.read_text()))
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            return {}  # Streamlit would fail to read it too: not a sign-in we can count on
    auth = merged.get("auth")
    return auth if isinstance(auth, dict) else {}


def oidc_providers(auth: Mapping | None) -> list[str | None]:
    """The providers `st.login(provider)` accepts for this [auth] table (None: the unnamed one)."""
    if not isinstance(auth, Mapping) or not auth.get("redirect_uri") or not auth.get("cookie_secret"):
        return []
    named = [k for k, v in auth.items() if isinstance(v, Mapping) and v.get("client_id")]
    return ([None] if auth.get("client_id") else []) + named


def refusal(host: str, settings: Settings, script: Path) -> str | None:
    """Why `moerag ui --host HOST` must not start (None: it may): beyond loopback it needs the UI
    password or a usable OIDC login (an [auth] section with a provider, and Authlib, which
    st.login needs)."""
    if is_loopback(host) or settings.ui_password:
        return None
    oidc = bool(oidc_providers(auth_section(secrets_files(script))))
    if oidc and importlib.util.find_spec("authlib") is not None:
        return None
    shown = host or "''"
    why = (f"--host {shown} serves the UI beyond this machine, so it needs a sign-in: set MOERAG_UI_PASSWORD"
           + (" (the [auth] section in secrets.toml needs Authlib for Streamlit's login: pip install Authlib)"
              if oidc else " (or configure Streamlit's OIDC login in .streamlit/secrets.toml)"))
    return why + ", or bind 127.0.0.1."


def password_matches(given: str, expected: str) -> bool:
    """Constant-time comparison, so the time taken says nothing about how much of a guess was right."""
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


@dataclass(frozen=True)
class UiScope:
    """The collections a UI user may see (empty: all) and whether they may change documents."""

    collections: tuple[str, ...] = ()
    read_only: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> UiScope:
        names = tuple(dict.fromkeys(n.strip() for n in settings.ui_collections.split(",") if n.strip()))
        return cls(names, settings.ui_read_only)

    def allows(self, collection: str) -> bool:
        return not self.collections or collection in self.collections

    def visible(self, names: Sequence[str]) -> list[str]:
        return [n for n in names if self.allows(n)]

    def check_read(self, collections: Sequence[str]) -> None:
        outside = [c for c in collections if not self.allows(c)]
        if outside:
            raise ScopeError(f"Collection {outside[0]!r} is not open in this UI; it shows only: "
                             f"{', '.join(self.collections)} (MOERAG_UI_COLLECTIONS).")

    def check_write(self, collection: str) -> None:
        if self.read_only:
            raise ScopeError("This UI is read-only (MOERAG_UI_READ_ONLY): documents can be added or removed "
                             "with `moerag ingest` and `moerag docs rm`.")
        self.check_read([collection])
