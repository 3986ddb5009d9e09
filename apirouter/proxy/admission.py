"""Who may send a request, and how often: client keys and the per-key rate limit.

Without ``APIROUTER_CLIENT_KEYS`` the client's own key is forwarded (pass-through); with
them, the client's key only admits it and the operator's key goes upstream.
"""

from __future__ import annotations

import hmac

from apirouter import errors
from apirouter.config.provider import Endpoint, RateLimit
from apirouter.config.settings import Settings
from apirouter.observe.context import RequestContext
from apirouter.observe.keys import ANONYMOUS
from apirouter.state.interface import Limiter


class Admission:
    def __init__(self, settings: Settings, limiter: Limiter) -> None:
        self.settings = settings
        self.limiter = limiter
        self._client_keys = tuple(k.encode() for k in settings.client_keys)

    def authorize(self, key: str | None) -> str | None:
        """Check the inbound key if client keys are configured; return the upstream key."""
        if not self._client_keys:
            return key or self.settings.default_api_key
        presented = (key or "").encode()
        if not any(hmac.compare_digest(presented, allowed) for allowed in self._client_keys):
            raise errors.Unauthorized(
                "Missing or invalid API key: send Authorization: Bearer <key> "
                "(or x-api-key: <key>)."
            )
        return self.settings.default_api_key

    def forwards_own_key(self, key: str | None) -> bool:
        """Does the client's own key go upstream (pass-through), rather than the operator's?"""
        return bool(key) and not self._client_keys

    def rate_limit(self, ctx: RequestContext, endpoint: Endpoint) -> None:
        limit = endpoint.rate_limit
        if limit is None and self.settings.rate_limit_rpm > 0:
            limit = RateLimit(self.settings.rate_limit_rpm, self.settings.rate_limit_burst)
        if limit is None:
            return
        wait = self.limiter.acquire((ctx.route, ctx.key_label), limit)
        if wait is not None:
            who = "anonymous clients" if ctx.key_label == ANONYMOUS else "this API key"
            raise errors.RateLimited(
                f"Rate limit of {limit.requests_per_minute} requests/minute (burst {limit.burst}) "
                f"exceeded for {who} on {ctx.route}; retry in {wait}s.",
                wait,
            )
