"""Active health checks: a cheap GET to each upstream, so an outage (or a rotated key) is
known before a user's request finds it.

Configured per provider with ``healthCheck: {"path": "/models", "intervalSecs": 30}``. The
GET costs no tokens and carries the key a request would carry when the client sends none:
a key header set in the config, else the upstream's ``apiKeyEnv``, else ``DEFAULT_API_KEY``
(``key_source`` says which; ``check-config`` prints it). A 2xx is healthy; with an operator
key, a 401 or 403 is unhealthy with reason ``auth``, because a rotated key is an outage too.
Without one (pure pass-through: each client brings its own key) any answer below 500 means
the upstream is up. A 5xx or a connection failure is unhealthy. Results go through the same
Reporter path as real attempts: they fill the failure windows, cool the upstream down or
close its breaker, and raise the alert and the recovery.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from apirouter import errors
from apirouter.config.headers import KEY_HEADERS
from apirouter.config.provider import ProviderConfig, UpstreamSpec
from apirouter.observe.report import Reporter
from apirouter.state.breakers import Target
from apirouter.upstream.client import Upstream

log = logging.getLogger("apirouter.probes")
TICK_SECONDS = 1.0


class HealthChecker:
    def __init__(
        self,
        current: Callable[[], ProviderConfig],
        upstream: Upstream,
        reporter: Reporter,
        environment: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
        default_key: str | None = None,
    ) -> None:
        self._current = current  # the live config: reloads change what is probed
        self._upstream = upstream
        self._reporter = reporter
        self._environment = environment
        self._default_key = default_key  # DEFAULT_API_KEY
        self._clock = clock
        self._due: dict[str, float] = {}

    def run(self, stopping: threading.Event) -> None:
        """Probe whatever is due, every second, until ``stopping`` is set."""
        while not stopping.wait(TICK_SECONDS):
            try:
                self.probe_due()
            except Exception:  # a checker that dies silently would be worse than none
                log.exception("health checks failed")

    def probe_due(self) -> int:
        """Probe each upstream whose interval has passed; return how many were probed."""
        config = self._current()
        now = self._clock()
        probed = 0
        for provider in (config, *config.fallbacks):
            check = provider.health_check
            if check is None:
                continue
            for upstream in provider.upstreams:
                target = Target(provider, upstream, fallback=provider is not config)
                if self._due.get(target.key, 0.0) > now:
                    continue
                self._due[target.key] = now + check.interval_secs
                self.probe(target)
                probed += 1
        return probed

    def probe(self, target: Target) -> None:
        check = target.provider.health_check
        assert check is not None
        url = target.upstream.base_url + check.path
        headers = self._headers(target)
        with_key = any(name in headers for name in KEY_HEADERS)
        try:
            response = self._upstream.send("GET", url, headers, b"")
            response.close()
            status = response.status_code
            failure = _failure(status, target.upstream.host, with_key)
        except errors.UpstreamFailure as error:
            status, failure = error.status, error
        if failure is None:
            self._reporter.probe_succeeded(target)
        else:
            self._reporter.probe_failed(target, failure, status)

    def _headers(self, target: Target) -> dict[str, str]:
        headers = {name.lower(): value for name, value in target.provider.headers.items()}
        key_name = target.upstream.api_key_env
        key = self._environment.get(key_name) if key_name else self._default_key
        if key and not any(name in headers for name in KEY_HEADERS):
            header = target.provider.endpoints.get("/v1/models")
            key_header = header.key_header if header else "authorization"
            headers[key_header] = f"Bearer {key}" if key_header == "authorization" else key
        headers["accept-encoding"] = "identity"
        return headers


def key_source(
    provider: ProviderConfig, upstream: UpstreamSpec, default_key_set: bool
) -> str | None:
    """Which key the health check of ``upstream`` carries, in words; None: no key."""
    configured = [name for name in provider.headers if name.lower() in KEY_HEADERS]
    if configured:
        return f"the configured {configured[0]} header"
    if upstream.api_key_env:
        return f"apiKeyEnv {upstream.api_key_env}"
    return "DEFAULT_API_KEY" if default_key_set else None


def _failure(status: int, host: str, with_key: bool) -> errors.UpstreamFailure | None:
    if 200 <= status < 300:
        return None
    if not with_key and status < 500:
        return None  # no key to refuse: any answer means the upstream is up
    if status in (401, 403):
        return errors.HealthCheckAuth(
            f"The upstream {host} refused the operator's key (HTTP {status})."
        )
    if status >= 500:
        return errors.HealthCheckFailed(
            f"The upstream {host} answered its health check with {status}."
        )
    return None  # other 4xx: the path may be wrong, but the upstream answered
