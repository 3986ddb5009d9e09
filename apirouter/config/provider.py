"""Provider configs: typed, frozen, strictly validated, hot-reloadable.

The JSON schema keeps the older router's camelCase names so operators can migrate:
``name``, ``baseUrl``, ``headers``, ``modelMapping``, ``keyHeader``, ``endpoints`` (keyed by
local path: ``upstreamPath``, ``method``, ``headers``, ``streamSupport``, ``bodyKinds``
(or the older ``requiresMultipart``), ``rateLimit``, ``streamConfig``, ``keyHeader``),
``rateLimit`` (``requestsPerMinute``, ``burst``), ``streamConfig`` (``bufferSize``,
``heartbeatIntervalSecs``), ``passthrough`` and ``port``.

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
from dataclasses import dataclass, field, replace
from functools import cached_property
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from apirouter.config import passthrough as passing
from apirouter.config.headers import HOP_BY_HOP, KEY_HEADERS, SET_BY_CLIENT_LIBRARY
from apirouter.config.routes import PLACEHOLDER, Match, RouteTable, placeholders, shape

log = logging.getLogger("apirouter.config")

DEFAULT_PROVIDER = "qwen"
DEFAULT_PORT = 8000
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
JSON_BODY, MULTIPART_BODY = "json", "multipart"
BODY_KINDS = (JSON_BODY, MULTIPART_BODY)
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
    heartbeat_interval_secs: float = 30.0
    # Ask for the final usage chunk on streaming chat requests that do not (clients then
    # see one last chunk with empty `choices`): the one exception to "only model changes".
    include_usage: bool = False


@dataclass(frozen=True)
class Endpoint:
    """One route. Provider-level fallbacks are settled at parse time, so every field is final."""

    local_path: str  # the template, e.g. /v1/files/{id}: also the route label
    upstream_path: str  # may use the template's placeholders
    methods: tuple[str, ...] = ("POST",)
    headers: Mapping[str, str] = field(default_factory=dict)
    stream_support: bool = True
    body_kinds: frozenset[str] = frozenset({JSON_BODY})  # what a POST body may be
    requires_model: bool = True
    max_body_bytes: int | None = None  # None: APIROUTER_MAX_BODY_BYTES applies
    rate_limit: RateLimit | None = None  # None: the environment's default applies
    stream_config: StreamConfig = StreamConfig()
    key_header: str = "authorization"
    # a passed-through path (``passthrough``): any method; a JSON body is read whole and
    # its model mapped, any other body is streamed as it came; never retried, never sent
    # to a fallback (stateful)
    passthrough: bool = False


@dataclass(frozen=True)
class UpstreamSpec:
    """One server of a provider. Its key, if any, comes from the environment at run time."""

    name: str
    base_url: str
    api_key_env: str | None = None
    weight: int = 1

    @cached_property  # read on every request: parse the URL once
    def host(self) -> str:
        return urlsplit(self.base_url).hostname or ""


RETRY_REASONS = ("connect", "timeout", "5xx", "429")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 2
    retry_on: frozenset[str] = frozenset(RETRY_REASONS)
    budget_seconds: float | None = None
    first_byte_timeout_secs: float | None = None


@dataclass(frozen=True)
class Cooldown:
    initial_secs: float = 30.0
    max_secs: float = 300.0


@dataclass(frozen=True)
class HealthCheck:
    path: str = "/models"
    interval_secs: float = 30.0


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    upstreams: tuple[UpstreamSpec, ...]
    headers: Mapping[str, str]
    model_mapping: Mapping[str, str]
    endpoints: Mapping[str, Endpoint]  # provider-level settings already folded in
    port: int
    retry: RetryPolicy = RetryPolicy()
    cooldown: Cooldown = Cooldown()
    health_check: HealthCheck | None = None
    fallbacks: tuple[ProviderConfig, ...] = ()  # in order; their own fallbacks are not followed
    passthrough: bool | frozenset[str] = True  # True, False, or the families let through
    # built-in routes the config switched off (``enabled: false``): 404, never passed through
    disabled: frozenset[str] = frozenset()
    # what a passed-through request is, before its label: the provider's key header,
    # rate limit and stream settings
    passthrough_endpoint: Endpoint = Endpoint("other", "/{path}", passthrough=True)

    @property
    def base_url(self) -> str:
        """The first upstream's base URL (the one stateful routes stay on)."""
        return self.upstreams[0].base_url

    @property
    def upstream_host(self) -> str:
        return self.upstreams[0].host

    @cached_property
    def routes(self) -> RouteTable[Endpoint]:
        return RouteTable(self.endpoints)

    def match(self, raw_path: str) -> Match[Endpoint] | None:
        """The route of ``raw_path``: a template, else pass-through (see
        ``config.passthrough``), else None (404)."""
        found = self.routes.match(raw_path)
        if found is not None or not raw_path.startswith(passing.PREFIX):
            return found
        if self._disabled_routes.match(raw_path) is not None:
            return None
        family = passing.family(raw_path)
        if family is None or not passing.allowed(family, self.passthrough):
            return None
        path = raw_path[len(passing.PREFIX) :]  # the upstream path is "/" + this
        return Match(self._passthrough_endpoints[passing.label(family)], {"path": path})

    @cached_property
    def _disabled_routes(self) -> RouteTable[str]:
        return RouteTable({template: template for template in self.disabled})

    @cached_property
    def _passthrough_endpoints(self) -> dict[str, Endpoint]:
        """One endpoint per label, made once: the label is the route in metrics and logs."""
        labels = [passing.OTHER, *(passing.label(f) for f in passing.FAMILIES)]
        return {label: replace(self.passthrough_endpoint, local_path=label) for label in labels}


# The routes every provider serves unless its config says otherwise. Upstream paths are
# relative to baseUrl, which carries the provider's OpenAI-compatible prefix (/v1,
# /compatible-mode/v1, /v1beta/openai...).
# The default upstream path is the local one without its /v1 prefix. Routes whose body has
# no `model` (files, batches, cancels) or an optional one (images, moderations) say so.
_NO_MODEL: dict[str, Any] = {"requiresModel": False}
_MULTIPART: dict[str, Any] = {"bodyKinds": [MULTIPART_BODY]}
_JSON_OR_MULTIPART: dict[str, Any] = {"bodyKinds": [JSON_BODY, MULTIPART_BODY]}
DEFAULT_ENDPOINTS: Mapping[str, dict[str, Any]] = {
    # GET lists stored completions; {id} reads, updates (POST: metadata) or deletes one
    "/v1/chat/completions": {"methods": ["POST", "GET"]},
    "/v1/chat/completions/{id}": {"methods": ["GET", "POST", "DELETE"], **_NO_MODEL},
    "/v1/chat/completions/{id}/messages": {"methods": ["GET"]},
    "/v1/completions": {},
    "/v1/embeddings": {"streamSupport": False},
    "/v1/messages": {},
    "/v1/messages/count_tokens": {"streamSupport": False},
    "/v1/responses": _NO_MODEL,
    "/v1/responses/{id}": {"methods": ["GET", "DELETE"]},
    # fixed segments, never an {id}: exact paths win over templates
    "/v1/responses/compact": _NO_MODEL,
    "/v1/responses/input_tokens": _NO_MODEL,
    "/v1/responses/{id}/cancel": _NO_MODEL,
    "/v1/responses/{id}/input_items": {"methods": ["GET"]},
    "/v1/models": {"methods": ["GET"]},
    "/v1/models/{model}": {"methods": ["GET", "DELETE"]},  # DELETE: a fine-tuned model
    "/v1/audio/transcriptions": _MULTIPART,
    "/v1/audio/translations": _MULTIPART,
    "/v1/audio/speech": {"streamSupport": False},
    "/v1/images/generations": _NO_MODEL,  # streams with "stream": true (partial images)
    "/v1/images/edits": {**_NO_MODEL, **_JSON_OR_MULTIPART},
    "/v1/images/variations": {**_NO_MODEL, **_MULTIPART},
    "/v1/moderations": {**_NO_MODEL, "streamSupport": False},
    # OpenAI accepts uploads of up to 512 MB; they are streamed, never held in memory.
    "/v1/files": {
        "methods": ["POST", "GET"],
        **_NO_MODEL,
        **_MULTIPART,
        "maxBodyBytes": 512 * 1024 * 1024,
    },
    "/v1/files/{id}": {"methods": ["GET", "DELETE"]},
    "/v1/files/{id}/content": {"methods": ["GET"]},
    "/v1/batches": {"methods": ["POST", "GET"], **_NO_MODEL},
    "/v1/batches/{id}": {"methods": ["GET"]},
    "/v1/batches/{id}/cancel": _NO_MODEL,
    # an upload's parts are up to 64 MB each: streamed upstream, never held whole
    "/v1/uploads/{id}/parts": {**_NO_MODEL, **_MULTIPART, "maxBodyBytes": 80 * 1024 * 1024},
}


def shipped_providers() -> list[str]:
    """Names of the provider configs shipped inside the package."""
    folder = resources.files("apirouter.config") / "providers"
    return sorted(
        p.name.removesuffix(".json") for p in folder.iterdir() if p.name.endswith(".json")
    )


def load(target: str | None, *, follow_fallbacks: bool = True) -> ProviderConfig:
    """Load a shipped provider by name, or a config file by path.

    An unknown name is an error listing the valid names: the older router silently fell
    back to qwen and sent keys to the wrong provider.
    """
    target = target or DEFAULT_PROVIDER
    names = shipped_providers()
    if target in names:
        text = (resources.files("apirouter.config") / "providers" / f"{target}.json").read_text()
        return parse(text, source=f"provider '{target}'", default_name=target)
    path = Path(target)
    if path.suffix == ".json" or "/" in target or path.exists():
        return load_file(path, follow_fallbacks=follow_fallbacks)
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


def load_file(path: Path, *, follow_fallbacks: bool = True) -> ProviderConfig:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigInvalid(
            str(path), [Problem("$", f"cannot read file: {exc.strerror}")]
        ) from None
    except UnicodeDecodeError:
        raise ConfigInvalid(str(path), [Problem("$", "file is not UTF-8 text")]) from None
    return parse(
        text,
        source=str(path),
        default_name=_name_from_path(path),
        base_dir=path.parent if follow_fallbacks else None,
        follow_fallbacks=follow_fallbacks,
    )


def _name_from_path(path: Path) -> str:
    name = re.sub(r"[^a-z0-9._-]", "-", path.stem.lower()).strip("-._") or "custom"
    return name[:63]


def parse(
    text: str,
    source: str,
    default_name: str = "custom",
    *,
    base_dir: Path | None = None,
    follow_fallbacks: bool = True,
) -> ProviderConfig:
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
    if not follow_fallbacks and isinstance(document, dict):
        document = {k: v for k, v in document.items() if k != "fallbacks"}
    config = _provider(document, problems, default_name, base_dir)
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
        elif name.lower() in SET_BY_CLIENT_LIBRARY:
            problems.append(
                Problem(where, "is set for each upstream request and cannot be configured")
            )
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


def _methods(value: Any, path: str, problems: Problems) -> list[str] | None:
    if not isinstance(value, list) or not value:
        problems.append(Problem(path, f"must be a non-empty array of: {', '.join(METHODS)}"))
        return None
    methods = [_method(item, f"{path}[{i}]", problems) for i, item in enumerate(value)]
    if None in methods:
        return None
    if len(set(methods)) != len(methods):
        problems.append(Problem(path, "lists a method twice"))
        return None
    return [m for m in methods if m is not None]


def _template(value: Any, path: str, problems: Problems) -> str | None:
    """A local path, whose segments may be placeholders such as ``{id}``."""
    text = _path(value, path, problems)
    if text is None:
        return None
    names = placeholders(text)
    leftover = PLACEHOLDER.sub("", text)
    segments = text.split("/")[1:]
    if (
        "{" in leftover
        or "}" in leftover
        or any(PLACEHOLDER.search(seg) and not PLACEHOLDER.fullmatch(seg) for seg in segments)
    ):
        problems.append(
            Problem(path, "a placeholder must be a whole segment, like /v1/files/{id}/content")
        )
        return None
    if len(set(names)) != len(names):
        problems.append(Problem(path, "uses the same placeholder twice"))
        return None
    return text


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
    fields = {
        "bufferSize": _int_range(1, 16 * 1024 * 1024),
        "heartbeatIntervalSecs": _seconds,
        "includeUsage": _boolean,
    }
    parsed = _object(value, path, problems, fields)
    if parsed is None or None in parsed.values():
        return None
    # bufferSize is accepted so the older router's configs load; chunks are relayed as
    # they arrive, so there is no buffer to size.
    return StreamConfig(
        parsed.get("heartbeatIntervalSecs", 30.0), parsed.get("includeUsage", False)
    )


def _body_kinds(value: Any, path: str, problems: Problems) -> frozenset[str] | None:
    if (
        not isinstance(value, list)
        or not value
        or any(kind not in BODY_KINDS for kind in value)
        or len(set(value)) != len(value)
    ):
        problems.append(
            Problem(path, f"must be a non-empty array of: {', '.join(BODY_KINDS)}, each once")
        )
        return None
    return frozenset(value)


def _passthrough(value: Any, path: str, problems: Problems) -> bool | frozenset[str] | None:
    if isinstance(value, bool):
        return value
    families = sorted(passing.FAMILIES)
    if not isinstance(value, list) or any(item not in passing.FAMILIES for item in value):
        problems.append(
            Problem(
                path,
                "must be true, false or an array of API families",
                f"families: {', '.join(families)} (admin APIs are never passed through)",
            )
        )
        return None
    return frozenset(value)


_ENDPOINT_FIELDS: dict[str, Callable[[Any, str, Problems], Any]] = {
    "upstreamPath": _template,
    "method": _method,
    "methods": _methods,
    "enabled": _boolean,
    "headers": _headers,
    "streamSupport": _boolean,
    "bodyKinds": _body_kinds,
    "requiresMultipart": _boolean,  # the older router's name: true is bodyKinds ["multipart"]
    "requiresModel": _boolean,
    "maxBodyBytes": _int_range(1, 1 << 40),
    "rateLimit": _rate_limit,
    "streamConfig": _stream_config,
    "keyHeader": _key_header,
}


def _endpoints(value: Any, path: str, problems: Problems) -> dict[str, dict[str, Any]] | None:
    if not isinstance(value, dict):
        problems.append(Problem(path, f"must be an object keyed by local path, not {_kind(value)}"))
        return None
    endpoints = {}
    shapes = {shape(template): template for template in DEFAULT_ENDPOINTS}
    for local_path, spec in value.items():
        where = _child(path, local_path)
        if _template(local_path, where, problems) is None:
            continue
        parsed = _object(spec, where, problems, _ENDPOINT_FIELDS)
        if parsed is None:
            continue
        same = shapes.setdefault(shape(local_path), local_path)
        if same != local_path:
            problems.append(
                Problem(where, f"matches the same paths as {same}", f"use {same} to refine it")
            )
        if "method" in parsed and "methods" in parsed:
            problems.append(Problem(where, "give method or methods, not both"))
        if "bodyKinds" in parsed and "requiresMultipart" in parsed:
            problems.append(Problem(where, "give bodyKinds or requiresMultipart, not both"))
        upstream = parsed.get("upstreamPath") or ""
        unknown = set(placeholders(upstream)) - set(placeholders(local_path))
        if unknown:
            problems.append(
                Problem(
                    _child(where, "upstreamPath"),
                    f"uses {', '.join('{' + n + '}' for n in sorted(unknown))}, "
                    f"which {local_path} does not have",
                )
            )
        endpoints[local_path] = parsed
    return endpoints


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _env_name(value: Any, path: str, problems: Problems) -> str | None:
    if not isinstance(value, str) or not _ENV_NAME.match(value):
        problems.append(
            Problem(
                path,
                "must be the name of an environment variable, e.g. OPENAI_API_KEY",
                "keys never go in config files: put the key in the environment",
            )
        )
        return None
    return value


def _label(value: Any, path: str, problems: Problems) -> str | None:
    if not isinstance(value, str) or not PROVIDER_NAME.match(value):
        problems.append(
            Problem(path, "must be lowercase letters, digits, '.', '_' or '-' (a metrics label)")
        )
        return None
    return value


def _required(
    value: Any, path: str, problems: Problems, parsed: dict[str, Any] | None, keys: tuple[str, ...]
) -> bool:
    missing = [k for k in keys if isinstance(value, dict) and k not in value]
    for key in missing:
        problems.append(Problem(_child(path, key), "is required"))
    return parsed is not None and not missing and None not in parsed.values()


_UPSTREAM_FIELDS: dict[str, Callable[[Any, str, Problems], Any]] = {
    "name": _label,
    "baseUrl": _base_url,
    "apiKeyEnv": _env_name,
    "weight": _int_range(1, 1000),
}


def _upstreams(value: Any, path: str, problems: Problems) -> list[UpstreamSpec] | None:
    if not isinstance(value, list) or not value:
        problems.append(Problem(path, "must be a non-empty array of {baseUrl, ...} objects"))
        return None
    specs = []
    for index, item in enumerate(value):
        where = f"{path}[{index}]"
        parsed = _object(item, where, problems, _UPSTREAM_FIELDS)
        if _required(item, where, problems, parsed, ("baseUrl",)) and parsed is not None:
            specs.append(parsed)
    if len(specs) != len(value):
        return None
    hosts = [urlsplit(spec["baseUrl"]).hostname or "" for spec in specs]
    upstreams = [
        UpstreamSpec(
            name=spec.get("name") or (host if hosts.count(host) == 1 else str(index)),
            base_url=spec["baseUrl"],
            api_key_env=spec.get("apiKeyEnv"),
            weight=spec.get("weight", 1),
        )
        for index, (spec, host) in enumerate(zip(specs, hosts, strict=True))
    ]
    names = [u.name for u in upstreams]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(Problem(path, f"two upstreams are named '{name}'", "names must differ"))
    return upstreams


def _retry_on(value: Any, path: str, problems: Problems) -> frozenset[str] | None:
    if not isinstance(value, list) or any(item not in RETRY_REASONS for item in value):
        problems.append(Problem(path, f"must be an array of: {', '.join(RETRY_REASONS)}"))
        return None
    return frozenset(value)


def _retry(value: Any, path: str, problems: Problems) -> RetryPolicy | None:
    fields = {
        "maxAttempts": _int_range(1, 10),
        "retryOn": _retry_on,
        "budgetSeconds": _seconds,
        "firstByteTimeoutSecs": _seconds,
    }
    parsed = _object(value, path, problems, fields)
    if parsed is None or None in parsed.values():
        return None
    return RetryPolicy(
        max_attempts=parsed.get("maxAttempts", 2),
        retry_on=parsed.get("retryOn", frozenset(RETRY_REASONS)),
        budget_seconds=parsed.get("budgetSeconds"),
        first_byte_timeout_secs=parsed.get("firstByteTimeoutSecs"),
    )


def _cooldown(value: Any, path: str, problems: Problems) -> Cooldown | None:
    parsed = _object(value, path, problems, {"initialSecs": _seconds, "maxSecs": _seconds})
    if parsed is None or None in parsed.values():
        return None
    cooldown = Cooldown(parsed.get("initialSecs", 30.0), parsed.get("maxSecs", 300.0))
    if cooldown.initial_secs > cooldown.max_secs:
        problems.append(Problem(path, "initialSecs must not be greater than maxSecs"))
        return None
    return cooldown


def _health_check(value: Any, path: str, problems: Problems) -> HealthCheck | None:
    parsed = _object(value, path, problems, {"path": _path, "intervalSecs": _seconds})
    if parsed is None or None in parsed.values():
        return None
    return HealthCheck(parsed.get("path", "/models"), parsed.get("intervalSecs", 30.0))


_FALLBACK_FIELDS: dict[str, Callable[[Any, str, Problems], Any]] = {
    "provider": _string,
    "config": _string,
    "apiKeyEnv": _env_name,
    "modelMapping": _model_mapping,
}


def _fallbacks(value: Any, path: str, problems: Problems) -> list[dict[str, Any]] | None:
    """Fallback entries, checked here and loaded once the whole config has parsed."""
    if not isinstance(value, list):
        problems.append(Problem(path, 'must be an array of {"provider": NAME} or {"config": PATH}'))
        return None
    entries = []
    for index, item in enumerate(value):
        where = f"{path}[{index}]"
        parsed = _object(item, where, problems, _FALLBACK_FIELDS)
        if parsed is None:
            continue
        if ("provider" in parsed) == ("config" in parsed):
            problems.append(Problem(where, "give provider (a shipped name) or config (a path)"))
            continue
        entries.append({**parsed, "where": where})
    return entries


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
    "upstreams": _upstreams,
    "retry": _retry,
    "cooldown": _cooldown,
    "healthCheck": _health_check,
    "fallbacks": _fallbacks,
    "passthrough": _passthrough,
}


def _provider(
    document: Any, problems: Problems, default_name: str, base_dir: Path | None
) -> ProviderConfig | None:
    parsed = _object(document, "$", problems, _PROVIDER_FIELDS)
    if parsed is None:
        return None
    if "baseUrl" in document and "upstreams" in document:
        problems.append(Problem("$.upstreams", "give baseUrl or upstreams, not both"))
    elif "baseUrl" not in document and "upstreams" not in document:
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
    provider_defaults = {
        "rateLimit": parsed.get("rateLimit"),
        "streamConfig": stream_config,
        "keyHeader": parsed.get("keyHeader", "authorization"),
    }
    specs = {**DEFAULT_ENDPOINTS, **_merged(parsed.get("endpoints", {}))}
    endpoints = {
        local: _endpoint(local, spec, provider_defaults)
        for local, spec in specs.items()
        if spec.get("enabled", True)
    }
    base_url: str = parsed.get("baseUrl") or ""
    upstreams = parsed.get("upstreams") or [
        UpstreamSpec(urlsplit(base_url).hostname or "0", base_url)
    ]
    fallbacks = tuple(
        fallback
        for entry in parsed.get("fallbacks", [])
        if (fallback := _load_fallback(entry, name, base_dir, problems)) is not None
    )
    if problems:
        return None
    return ProviderConfig(
        name=name,
        upstreams=tuple(upstreams),
        headers=parsed.get("headers", MappingProxyType({})),
        model_mapping=parsed.get("modelMapping", MappingProxyType({})),
        endpoints=MappingProxyType(endpoints),
        port=parsed.get("port", DEFAULT_PORT),
        retry=parsed.get("retry") or RetryPolicy(),
        cooldown=parsed.get("cooldown") or Cooldown(),
        health_check=parsed.get("healthCheck"),
        fallbacks=fallbacks,
        passthrough=parsed.get("passthrough", True),
        disabled=frozenset(specs.keys() - endpoints.keys()),
        passthrough_endpoint=_passthrough_endpoint(provider_defaults),
    )


def _load_fallback(
    entry: dict[str, Any], primary: str, base_dir: Path | None, problems: Problems
) -> ProviderConfig | None:
    """Load one fallback provider with the entry's overrides; its own fallbacks are not
    followed, so fallback configs can never loop."""
    where = entry["where"]
    target = entry.get("provider") or str((base_dir or Path()) / entry["config"])
    if "provider" in entry and target not in shipped_providers():
        problems.append(
            Problem(f"{where}.provider", f"unknown provider '{target}'", "or use config: PATH")
        )
        return None
    try:
        config = load(target, follow_fallbacks=False)
    except ConfigInvalid as exc:
        details = "; ".join(f"{p.path}: {p.message}" for p in exc.problems[:3])
        problems.append(Problem(where, f"cannot load {exc.source}: {details}"))
        return None
    if "apiKeyEnv" in entry:
        upstreams = tuple(replace(u, api_key_env=entry["apiKeyEnv"]) for u in config.upstreams)
        config = replace(config, upstreams=upstreams)
    if "modelMapping" in entry:
        config = replace(config, model_mapping=entry["modelMapping"])
    if config.name == primary:
        problems.append(Problem(where, f"falls back to '{primary}' itself", "rename one of them"))
    if any(u.api_key_env is None for u in config.upstreams):
        problems.append(
            Problem(
                where,
                f"fallback '{config.name}' needs an operator key: a client's key belongs "
                "to one provider",
                'add "apiKeyEnv": "NAME_OF_THE_VARIABLE_HOLDING_ITS_KEY"',
            )
        )
    return replace(config, fallbacks=())


def _merged(overrides: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Config endpoints refine the default ones field by field, or add new local paths."""
    merged = {}
    for path, spec in overrides.items():
        default = dict(DEFAULT_ENDPOINTS.get(path, {}))
        if "method" in spec:  # a route's own `method` replaces the built-in `methods`
            default.pop("methods", None)
        if "requiresMultipart" in spec:  # the older name replaces the built-in bodyKinds
            default.pop("bodyKinds", None)
        merged[path] = {**default, **spec}
    return merged


def _endpoint(local_path: str, spec: dict[str, Any], defaults: dict[str, Any]) -> Endpoint:
    """An endpoint's own setting wins; otherwise the provider's (``defaults``) applies."""
    spec = {**defaults, **{k: v for k, v in spec.items() if v is not None}}
    return Endpoint(
        local_path=local_path,
        upstream_path=spec.get("upstreamPath") or local_path.removeprefix("/v1"),
        methods=tuple(spec.get("methods") or [spec.get("method", "POST")]),
        headers=spec.get("headers", MappingProxyType({})),
        stream_support=spec.get("streamSupport", True),
        body_kinds=frozenset(spec.get("bodyKinds") or _older_body_kinds(spec)),
        requires_model=spec.get("requiresModel", True),
        max_body_bytes=spec.get("maxBodyBytes"),
        rate_limit=spec["rateLimit"],
        stream_config=spec["streamConfig"],
        key_header=spec["keyHeader"],
    )


def _older_body_kinds(spec: dict[str, Any]) -> frozenset[str]:
    """``requiresMultipart`` (the older router's boolean) read as ``bodyKinds``."""
    return frozenset({MULTIPART_BODY if spec.get("requiresMultipart") else JSON_BODY})


def _passthrough_endpoint(defaults: dict[str, Any]) -> Endpoint:
    """A passed-through request, before it is labelled with its family: any method, any
    body, the path as the client sent it, the provider's key header and limits."""
    return Endpoint(
        local_path=passing.OTHER,
        upstream_path="/{path}",
        methods=METHODS,
        requires_model=False,
        body_kinds=frozenset(BODY_KINDS),
        rate_limit=defaults["rateLimit"],
        stream_config=defaults["streamConfig"],
        key_header=defaults["keyHeader"],
        passthrough=True,
    )


# Told of every reload: the problem (None when the new config took effect) and the config
# that is serving afterwards.
ReloadListener = Callable[[ConfigInvalid | None, ProviderConfig], None]


class ConfigStore:
    """The live provider config, reloaded when its file changes.

    A bad reload is logged and ignored: the last good config keeps serving. Shipped
    providers (no path) never change, so they are never re-read.
    """

    def __init__(
        self,
        config: ProviderConfig,
        path: Path | None = None,
        *,
        on_reload: ReloadListener = lambda problem, current: None,
    ) -> None:
        self._config = config
        self._path = path
        self._lock = threading.Lock()
        self._signature = self._file_signature()
        self._on_reload = on_reload

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
                self._on_reload(exc, self._config)
                return False
            if config.port != self._config.port:
                log.warning(
                    "config port changed to %d: restart apirouter to listen there", config.port
                )
            self._config = config
        self._on_reload(None, config)
        return True
