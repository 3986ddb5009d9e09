"""sentry-sdk's private names, reached from here only (see ``apirouter.private``).

``delivery.RouterTransport`` extends the SDK's HTTP transport to count what it loses and
to keep alerts off its queue. The SDK offers no public hooks for that, so this module
turns the private steps it needs into public ones:

- ``_send_request`` / ``_handle_response``: where a send fails on the network, or comes
  back with a status, per envelope (the SDK's own client reports lump these together or,
  for a 429, leave them out);
- ``_worker``: the SDK's background queue, so that the transport can tell when it refused
  an envelope (it drops them silently when full);
- ``_send_envelope`` / ``_flush_client_reports``: what the worker runs for each envelope.
"""

from __future__ import annotations

from typing import Any

from sentry_sdk.envelope import Envelope
from sentry_sdk.transport import BaseHttpTransport, HttpTransport, HttpTransportCore

from apirouter.private import PrivateName

PRIVATE_NAMES = (
    PrivateName(BaseHttpTransport, "_send_request", "a send's network failure, per envelope"),
    PrivateName(HttpTransportCore, "_handle_response", "a send's status, per envelope"),
    PrivateName(HttpTransportCore, "_worker", "the queue that drops when full", on_instances=True),
    PrivateName(BaseHttpTransport, "_send_envelope", "what the worker runs per envelope"),
    PrivateName(BaseHttpTransport, "_flush_client_reports", "the SDK's own loss reports"),
)


class HookedTransport(HttpTransport):
    """The SDK's HTTP transport with public hooks for its private steps."""

    def _send_request(
        self,
        body: bytes,
        headers: dict[str, str],
        endpoint_type: Any,
        envelope: Envelope | None = None,
    ) -> None:
        self.send_request(body, headers, endpoint_type, envelope)

    def send_request(
        self, body: bytes, headers: dict[str, str], endpoint_type: Any, envelope: Envelope | None
    ) -> None:
        """POST one envelope (raises on a network failure, after counting it as lost)."""
        HttpTransport._send_request(self, body, headers, endpoint_type, envelope)

    def _handle_response(self, response: Any, envelope: Envelope | None) -> None:
        self.handle_response(response, envelope)

    def handle_response(self, response: Any, envelope: Envelope | None) -> None:
        """Rate limits, 413s and loss counting, as the SDK does for each response."""
        HttpTransport._handle_response(self, response, envelope)

    def submit(self, job: Any) -> bool:
        """Queue ``job`` on the SDK's worker; False when its queue is full."""
        return bool(self._worker.submit(job))

    def send_now(self, envelope: Envelope) -> None:
        """Send ``envelope`` and any pending client report (on the worker's thread)."""
        self._send_envelope(envelope)
        self._flush_client_reports()
