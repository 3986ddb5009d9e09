"""Provider configs: typed, frozen, strictly validated, hot-reloadable.

The JSON schema keeps the older router's camelCase names so operators can migrate:
``name``, ``baseUrl``, ``headers``, ``modelMapping``, ``keyHeader``, ``endpoints`` (keyed by
local path: ``upstreamPath``, ``method``, ``headers``, ``streamSupport``,
``requiresMultipart``, ``rateLimit``, ``streamConfig``, ``keyHeader``), ``rateLimit``
(``requestsPerMinute``, ``burst``), ``streamConfig`` (``bufferSize``,
``heartbeatIntervalSecs``) and ``port``.

``parse`` reports *every* problem at once, each with its JSON path, because an operator
fixing a config in CI should not need one run per typo. ``ConfigStore`` keeps the last good
config when a hot reload finds a broken file: a bad edit must never take traffic down.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("apirouter.config")

DEFAULT_PROVIDER = "qwen"
DEFAULT_PORT = 8000
HOP_BY_HOP = frozenset(
    (
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
        "host",
        "content-length",
    )
)
KEY_HEADERS = ("authorization", "x-api-key", "api-key")
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# A provider name is a metrics label and a Sentry tag: short, lowercase, no spaces.
# Shared with anything else that names a provider (test-alert's --provider).
PROVIDER_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class Problem:
    """One thing wrong (or risky) in a config or environment, addressed by JSON path."""

    path: str
    message: str
    hint: str = ""
    severity: str = "error"
    line: int | None = None
    column: int | None = None


class ConfigInvalid(ValueError):
    """A config could not be loaded; ``problems`` holds every reason found."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        details = "; ".join(f"{p.path}: {p.message}" for p in problems)
        super().__init__(f"{source}: {details}")


@dataclass(frozen=True)
class RateLimit:
    requests_per_minute: int
    burst: int


@dataclass(frozen=True)
class StreamConfig:
    buffer_size: int = 8192
    heartbeat_interval_secs: float = 30.0


@dataclass(frozen=True)
class Endpoint:
    local_path: str
    upstream_path: str
    method: str = "POST"
    headers: Mapping[str, str] = field(default_factory=dict)
    stream_support: bool = True
    requires_multipart: bool = False
    rate_limit: RateLimit | None = None
    stream_config: StreamConfig | None = None
    key_header: str | None = None


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    base_url: str
    headers: Mapping[str, str]
    model_mapping: Mapping[str, str]
    endpoints: Mapping[str, Endpoint]
    rate_limit: RateLimit | None
    stream_config: StreamConfig
    port: int
    key_header: str

    @cached_property  # read on every request: parse the URL once
    def upstream_host(self) -> str:
        return urlsplit(self.base_url).hostname or ""


# The routes every provider serves unless its config says otherwise. Upstream paths are
# relative to baseUrl, which carries the provider's OpenAI-compatible prefix (/v1,
# /compatible-mode/v1, /v1beta/openai...).
DEFAULT_ENDPOINTS: Mapping[str, dict[str, Any]] = {
    "/v1/chat/completions": {"upstreamPath": "/chat/completions"},
    "/v1/completions": {"upstreamPath": "/completions"},
    "/v1/embeddings": {"upstreamPath": "/embeddings", "streamSupport": False},
    "/v1/messages": {"upstreamPath": "/messages"},
    "/v1/audio/transcriptions": {
        "upstreamPath": "/audio/transcriptions",
        "requiresMultipart": True,
    },
    "/v1/audio/translations": {"upstreamPath": "/audio/translations", "requiresMultipart": True},
}


def shipped_providers() -> list[str]:
    """Names of the provider configs shipped inside the package."""
    folder = resources.files("apirouter") / "providers"
    return sorted(
        p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json")
    )


def load(target: str | None) -> ProviderConfig:
    """Load a shipped provider by name, or a config file by path.

    An unknown name is an error listing the valid names: the older router silently fell
    back to qwen and sent keys to the wrong provider.
    """
    target = target or DEFAULT_PROVIDER
    names = shipped_providers()
    if target in names:
        text = (resources.files("apirouter") / "providers" / f"{target}.json").read_text()
        return parse(text, source=f"provider '{target}'", default_name=target)
    path = Path(target)
    if path.suffix == ".json" or "/" in target or path.exists():
        return load_file(path)
    raise ConfigInvalid(
        f"provider '{target}'",
        [
            Problem(
                "$",
                f"unknown provider '{target}'",
                f"use one of: {', '.join(names)}, or the path of a config file",
            )
        ],
    )


def load_file(path: Path) -> ProviderConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigInvalid(
            str(path), [Problem("$", f"cannot read file: {exc.strerror}")]
        ) from None
    except UnicodeDecodeError:
        raise ConfigInvalid(str(path), [Problem("$", "file is not UTF-8 text")]) from None
    return parse(text, source=str(path), default_name=_name_from_path(path))


def _name_from_path(path: Path) -> str:
    name = re.sub(r"[^a-z0-9._-]", "-", path.stem.lower()).strip("-._") or "custom"
    return name[:63]


def parse(text: str, source: str, default_name: str = "custom") -> ProviderConfig:
    """Parse and validate config JSON text; raise ConfigInvalid with every problem."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        problem = Problem(
            "$",
            f"invalid JSON: {exc.msg}",
            "check for a missing comma, quote or bracket near that position",
            line=exc.lineno,
            column=exc.colno,
        )
        raise ConfigInvalid(source, [problem]) from None
    problems: list[Problem] = []
    config = _provider(document, problems, default_name)
    if problems or config is None:
        raise ConfigInvalid(source, problems)
    return config


# --- validation ------------------------------------------------------------------------
# Each checker takes (value, path, problems) and returns the parsed value, or None after
# appending a Problem. Checkers never raise, so one pass finds every problem.

Problems = list[Problem]


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else f'{path}["{key}"]'


def _object(
    value: Any, path: str, problems: Problems, allowed: dict[str, Any]
) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        problems.append(Problem(path, f"must be an object, not {_kind(value)}"))
        return None
    for key in value:
        if key not in allowed:
            problems.append(
                Problem(_child(path, key), "unknown key", _unknown_key_hint(key, allowed))
            )
    return {
        k: check(value[k], _child(path, k), problems) for k, check in allowed.items() if k in value
    }


def _unknown_key_hint(key: str, allowed: Mapping[str, Any]) -> str:
    """Suggest the closest allowed key: typos (modelMaping), snake_case (base_url), case."""
    folded = {k.lower(): k for k in allowed}
    close = difflib.get_close_matches(key.lower().replace("_", ""), folded, n=1, cutoff=0.75)
    return f"did you mean '{folded[close[0]]}'?" if close else f"allowed: {', '.join(allowed)}"


def _kind(value: Any) -> str:
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def _string(value: Any, path: str, problems: Problems) -> str | None:
    if not isinstance(value, str) or not value:
        problems.append(Problem(path, f"must be a non-empty string, not {_kind(value)}"))
        return None
    return value


def _boolean(value: Any, path: str, problems: Problems) -> bool | None:
    if not isinstance(value, bool):
        problems.append(Problem(path, f"must be true or false, not {_kind(value)}"))
        return None
    return value


def _int_range(low: int, high: int) -> Callable[[Any, str, Problems], int | None]:
    def check(value: Any, path: str, problems: Problems) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            problems.append(Problem(path, f"must be a whole number from {low} to {high}"))
            return None
        return value

    return check


def _seconds(value: Any, path: str, problems: Problems) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 3600:
        problems.append(Problem(path, "must be a number of seconds greater than 0 (max 3600)"))
        return None
    return float(value)


def _base_url(value: Any, path: str, problems: Problems) -> str | None:
    text = _string(value, path, problems)
    if text is None:
        return None
    parts = urlsplit(text)
    message = None
    if parts.scheme not in ("http", "https"):
        message = "must be an http:// or https:// URL"
    elif not parts.hostname:
        message = "must include a host name"
    elif parts.username or parts.password:
        message = "must not contain credentials; put keys in headers or DEFAULT_API_KEY"
    elif parts.query or parts.fragment:
        message = "must not have a query string or fragment"
    else:
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            message = "has an invalid port"
    if message:
        problems.append(Problem(path, message, "e.g. https://api.openai.com/v1"))
        return None
    return text.rstrip("/")


def _headers(value: Any, path: str, problems: Problems) -> Mapping[str, str] | None:
    if not isinstance(value, dict):
        problems.append(
            Problem(path, f"must be an object of header names to values, not {_kind(value)}")
        )
        return None
    headers = {}
    for name, header_value in value.items():
        where = _child(path, name)
        if not _TOKEN.match(name):
            problems.append(Problem(where, "is not a valid header name"))
        elif name.lower() in HOP_BY_HOP:
            problems.append(Problem(where, "is a hop-by-hop header and cannot be configured"))
        elif not isinstance(header_value, str):
            problems.append(Problem(where, f"value must be a string, not {_kind(header_value)}"))
        elif any(c in header_value for c in "\r\n\0"):
            problems.append(
                Problem(
                    where,
                    "value must not contain CR, LF or NUL",
                    "header injection: remove the line break",
                )
            )
        else:
            headers[name] = header_value
    return MappingProxyType(headers)


def _model_mapping(value: Any, path: str, problems: Problems) -> Mapping[str, str] | None:
    if not isinstance(value, dict):
        problems.append(Problem(path, f"must be an object of model names, not {_kind(value)}"))
        return None
    mapping = {}
    for alias, target in value.items():
        if not alias:
            problems.append(Problem(path, "model alias must not be empty"))
        elif _string(target, _child(path, alias), problems) is not None:
            mapping[alias] = target
    return MappingProxyType(mapping)


def _key_header(value: Any, path: str, problems: Problems) -> str | None:
    if not isinstance(value, str) or value.lower() not in KEY_HEADERS:
        problems.append(
            Problem(
                path,
                f"must be one of: {', '.join(KEY_HEADERS)}",
                "authorization sends 'Bearer KEY'; the others send the bare key",
            )
        )
        return None
    return value.lower()


def _method(value: Any, path: str, problems: Problems) -> str | None:
    if not isinstance(value, str) or value.upper() not in METHODS:
        problems.append(Problem(path, f"must be one of: {', '.join(METHODS)}"))
        return None
    return value.upper()


def _path(value: Any, path: str, problems: Problems) -> str | None:
    text = _string(value, path, problems)
    if text is not None and (not text.startswith("/") or any(c in text for c in "?#\r\n ")):
        problems.append(Problem(path, "must be a path starting with '/' (no query string)"))
        return None
    return text


def _rate_limit(value: Any, path: str, problems: Problems) -> RateLimit | None:
    fields = {"requestsPerMinute": _int_range(1, 1_000_000), "burst": _int_range(1, 1_000_000)}
    parsed = _object(value, path, problems, fields)
    if parsed is None:
        return None
    for key in fields:
        if key not in value:
            problems.append(Problem(_child(path, key), "is required"))
    if None in parsed.values() or len(parsed) < len(fields):
        return None
    return RateLimit(parsed["requestsPerMinute"], parsed["burst"])


def _stream_config(value: Any, path: str, problems: Problems) -> StreamConfig | None:
    fields = {"bufferSize": _int_range(1, 16 * 1024 * 1024), "heartbeatIntervalSecs": _seconds}
    parsed = _object(value, path, problems, fields)
    if parsed is None or None in parsed.values():
        return None
    return StreamConfig(parsed.get("bufferSize", 8192), parsed.get("heartbeatIntervalSecs", 30.0))


_ENDPOINT_FIELDS: dict[str, Callable[[Any, str, Problems], Any]] = {
    "upstreamPath": _path,
    "method": _method,
    "headers": _headers,
    "streamSupport": _boolean,
    "requiresMultipart": _boolean,
    "rateLimit": _rate_limit,
    "streamConfig": _stream_config,
    "keyHeader": _key_header,
}


def _endpoints(value: Any, path: str, problems: Problems) -> dict[str, dict[str, Any]] | None:
    if not isinstance(value, dict):
        problems.append(Problem(path, f"must be an object keyed by local path, not {_kind(value)}"))
        return None
    endpoints = {}
    for local_path, spec in value.items():
        where = _child(path, local_path)
        if _path(local_path, where, problems) is None:
            continue
        parsed = _object(spec, where, problems, _ENDPOINT_FIELDS)
        if parsed is not None:
            endpoints[local_path] = parsed
    return endpoints


_PROVIDER_FIELDS: dict[str, Callable[[Any, str, Problems], Any]] = {
    "name": _string,
    "baseUrl": _base_url,
    "headers": _headers,
    "modelMapping": _model_mapping,
    "keyHeader": _key_header,
    "endpoints": _endpoints,
    "rateLimit": _rate_limit,
    "streamConfig": _stream_config,
    "port": _int_range(1, 65535),
}


def _provider(document: Any, problems: Problems, default_name: str) -> ProviderConfig | None:
    parsed = _object(document, "$", problems, _PROVIDER_FIELDS)
    if parsed is None:
        return None
    if "baseUrl" not in document:
        problems.append(Problem("$.baseUrl", "is required", "e.g. https://api.openai.com/v1"))
    name = parsed.get("name") or default_name
    if not PROVIDER_NAME.match(name):
        problems.append(
            Problem(
                "$.name",
                "must be lowercase letters, digits, '.', '_' or '-' (it is a metrics label)",
            )
        )
    if problems:
        return None
    stream_config = parsed.get("streamConfig") or StreamConfig()
    endpoints = {
        local: _endpoint(local, spec, stream_config)
        for local, spec in {**DEFAULT_ENDPOINTS, **_merged(parsed.get("endpoints", {}))}.items()
    }
    return ProviderConfig(
        name=name,
        base_url=parsed["baseUrl"],
        headers=parsed.get("headers", MappingProxyType({})),
        model_mapping=parsed.get("modelMapping", MappingProxyType({})),
        endpoints=MappingProxyType(endpoints),
        rate_limit=parsed.get("rateLimit"),
        stream_config=stream_config,
        port=parsed.get("port", DEFAULT_PORT),
        key_header=parsed.get("keyHeader", "authorization"),
    )


def _merged(overrides: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Config endpoints refine the default ones field by field, or add new local paths."""
    return {path: {**DEFAULT_ENDPOINTS.get(path, {}), **spec} for path, spec in overrides.items()}


def _endpoint(local_path: str, spec: dict[str, Any], stream_config: StreamConfig) -> Endpoint:
    return Endpoint(
        local_path=local_path,
        upstream_path=spec.get("upstreamPath") or local_path.removeprefix("/v1"),
        method=spec.get("method", "POST"),
        headers=spec.get("headers", MappingProxyType({})),
        stream_support=spec.get("streamSupport", True),
        requires_multipart=spec.get("requiresMultipart", False),
        rate_limit=spec.get("rateLimit"),
        stream_config=spec.get("streamConfig") or stream_config,
        key_header=spec.get("keyHeader"),
    )


class ConfigStore:
    """The live provider config, reloaded when its file changes.

    A bad reload is logged and ignored: the last good config keeps serving. Shipped
    providers (no path) never change, so they are never re-read.
    """

    def __init__(self, config: ProviderConfig, path: Path | None = None) -> None:
        self._config = config
        self._path = path
        self._lock = threading.Lock()
        self._signature = self._file_signature()
        self.on_reload: Callable[[ConfigInvalid | None], None] = log_reload

    @property
    def current(self) -> ProviderConfig:
        return self._config

    def _file_signature(self) -> tuple[int, int] | None:
        if self._path is None:
            return None
        try:
            stat = self._path.stat()
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size)

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed; return True when a new config took effect."""
        with self._lock:
            signature = self._file_signature()
            if self._path is None or signature is None or signature == self._signature:
                return False
            self._signature = signature
            try:
                config = load_file(self._path)
            except ConfigInvalid as exc:
                self.on_reload(exc)
                return False
            if config.port != self._config.port:
                log.warning(
                    "config port changed to %d: restart apirouter to listen there", config.port
                )
            self._config = config
        self.on_reload(None)
        return True


def log_reload(problem: ConfigInvalid | None, extra: Mapping[str, Any] | None = None) -> None:
    """Say what a reload did. A bad file never replaces the config that is serving."""
    if problem is None:
        log.info("config reloaded")
    else:
        log.error("config reload failed, keeping the last good config: %s", problem, extra=extra)
