"""The ingress's front gate, an ASGI middleware: docs switch, body-size cap, bearer token, rate limit.

Checked in that order, before FastAPI parses anything, each answered with a JSON error:
  404  /docs, /redoc and /openapi.json when `docs: false`;
  413  a body larger than `max_body_bytes` (Content-Length, or counted while reading a chunked body);
  401  a missing or wrong `Authorization: Bearer <token>` when auth is on (`/healthz` and
       `/readyz` stay open for probes);
  429  a client over `rate_limit_qps` (token bucket of `rate_limit_burst`), with Retry-After.
The token is never in a config or a command line: `auth_token_env` names an environment variable
and `auth_token_file` a (mounted) file; either may hold several tokens, one per line, so a token
can be rotated without downtime. The file is re-read when it changes.

Settings live in this module's `GuardConfig`, set by the ingress's `reconfigure` through
`configure()`: the middleware is created by FastAPI inside the replica, so it reads them by module.
"""
from __future__ import annotations

import hmac
import json
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

OPEN_PATHS = ("/healthz", "/readyz")
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
MAX_TRACKED_CLIENTS = 10_000


@dataclass(kw_only=True)
class GuardConfig:
    max_body_bytes: int = 64 * 1024
    auth_token_env: str | None = None  # name of an env var holding the token(s)
    auth_token_file: str | None = None  # path of a file holding the token(s), one per line
    rate_limit_qps: float = 0.0  # per client; 0 turns the limit off
    rate_limit_burst: int = 0  # bucket size; 0 means max(1, qps)
    rate_limit_key: str = "ip"  # "ip" | "token" | "header:<Name>" (e.g. header:X-Forwarded-For)
    docs: bool = True

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.rate_limit_qps < 0 or self.rate_limit_burst < 0:
            raise ValueError("rate_limit_qps and rate_limit_burst must be >= 0")
        if not (self.rate_limit_key in ("ip", "token") or self.rate_limit_key.startswith("header:")):
            raise ValueError(f"rate_limit_key must be 'ip', 'token' or 'header:<Name>', not {self.rate_limit_key!r}")
        if self.rate_limit_key == "token" and not self.auth:
            raise ValueError("rate_limit_key 'token' needs auth (auth_token_env or auth_token_file)")

    @property
    def auth(self) -> bool:
        return bool(self.auth_token_env or self.auth_token_file)

    @classmethod
    def from_user_config(cls, cfg: dict[str, Any]) -> "GuardConfig":
        if "auth_token" in cfg or "token" in cfg:
            raise ValueError("never put a token in the Serve config: name an environment variable "
                             "(auth_token_env) or a mounted file (auth_token_file) instead")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names})


def read_tokens(env: str | None, file: str | Path | None) -> tuple[str, ...]:
    """Tokens, one per line, from an environment variable and/or a file (never from argv)."""
    tokens = []
    if env:
        tokens += [t.strip() for t in os.environ.get(env, "").splitlines() if t.strip()]
    if file:
        tokens += [t.strip() for t in Path(file).read_text().splitlines() if t.strip()]
    return tuple(tokens)


def client_headers(env: str = "KARMA_API_TOKEN", file: str | Path | None = None) -> dict[str, str]:
    """The Authorization header a client sends, from $KARMA_API_TOKEN or a token file; {} if none."""
    tokens = read_tokens(env, file)
    return {"Authorization": f"Bearer {tokens[0]}"} if tokens else {}


@dataclass
class TokenSource:
    """The accepted tokens, from an env var and/or a file (re-read when its mtime changes)."""

    env: str | None
    file: str | None
    _tokens: tuple[str, ...] = field(default=(), init=False)
    _mtime: float | None = field(default=None, init=False)
    _checked: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self._tokens = self._read()
        if not self._tokens:
            raise ValueError(f"auth is on but no token was found (env {self.env!r}, file {self.file!r})")

    def _read(self) -> tuple[str, ...]:
        if self.file:
            self._mtime = Path(self.file).stat().st_mtime
        return read_tokens(self.env, self.file)

    def accepts(self, presented: str) -> bool:
        now = time.monotonic()
        if self.file and now - self._checked > 1.0:  # at most one stat a second
            self._checked = now
            try:
                if Path(self.file).stat().st_mtime != self._mtime:
                    self._tokens = self._read() or self._tokens
            except OSError:
                pass  # keep the last good tokens while a mounted secret is being swapped
        ok = False
        for t in self._tokens:  # compare with every token: timing does not reveal which one matched
            ok |= hmac.compare_digest(presented.encode(), t.encode())
        return ok


class RateLimiter:
    """A token bucket per client key, bounded to the most recent MAX_TRACKED_CLIENTS keys."""

    def __init__(self, qps: float, burst: int):
        self.qps, self.burst = qps, float(burst or max(1.0, qps))
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def retry_after(self, key: str) -> float:
        """0 if the request may go now (and take a token), else seconds until a token is back."""
        now = time.monotonic()
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.qps)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.qps
        self._buckets[key] = (tokens - 1 if tokens >= 1 else tokens, now)
        if len(self._buckets) > MAX_TRACKED_CLIENTS:
            self._buckets.popitem(last=False)
        return wait


class Settings:
    config = GuardConfig()
    tokens: TokenSource | None = None
    limiter: RateLimiter | None = None


def configure(cfg: GuardConfig) -> None:
    """Apply a GuardConfig to this process's middleware (called from the ingress's reconfigure)."""
    tokens = TokenSource(cfg.auth_token_env, cfg.auth_token_file) if cfg.auth else None
    limiter = RateLimiter(cfg.rate_limit_qps, cfg.rate_limit_burst) if cfg.rate_limit_qps else None
    Settings.config, Settings.tokens, Settings.limiter = cfg, tokens, limiter


async def _reply(send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"error": message}).encode()
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


class Guard:
    """ASGI middleware applying `Settings` to every HTTP request of the app it wraps."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cfg, path = Settings.config, scope.get("path", "")
        if path in DOCS_PATHS and not cfg.docs:
            return await _reply(send, 404, "not found (the API docs are turned off)")
        body_or_error = await _read_body(scope, receive, cfg.max_body_bytes)
        if isinstance(body_or_error, str):
            return await _reply(send, 413, body_or_error)
        token = _bearer(scope)
        if Settings.tokens is not None and path not in OPEN_PATHS and path not in DOCS_PATHS:
            if token is None or not Settings.tokens.accepts(token):
                return await _reply(send, 401, "missing or invalid bearer token",
                                    {"WWW-Authenticate": 'Bearer realm="karma-ray"'})
        if Settings.limiter is not None and path not in OPEN_PATHS:
            wait = Settings.limiter.retry_after(_client_key(scope, cfg.rate_limit_key, token))
            if wait > 0:
                return await _reply(send, 429, f"rate limit of {cfg.rate_limit_qps:g} requests/s per client exceeded",
                                    {"Retry-After": str(max(1, int(wait + 0.999)))})
        await self.app(scope, _replay(body_or_error, receive), send)


async def _read_body(scope, receive, limit: int) -> bytes | str:
    """The whole request body, or an error message once it is known to exceed `limit` bytes."""
    declared = _header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return f"request body of {declared} bytes exceeds the limit of {limit} bytes"
    chunks, size = [], 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            break
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            return f"request body exceeds the limit of {limit} bytes"
        chunks.append(chunk)
        if not msg.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """The body already read, then the real channel (which reports the client's disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay


def _bearer(scope) -> str | None:
    auth = _header(scope, b"authorization")
    if auth and auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return None


def _client_key(scope, how: str, token: str | None) -> str:
    if how == "token" and token:
        return "token:" + token
    if how.startswith("header:"):
        value = _header(scope, how[7:].strip().lower().encode())
        if value:
            return "header:" + value.split(",")[0].strip()
    client = scope.get("client") or ("unknown", 0)
    return "ip:" + str(client[0])
