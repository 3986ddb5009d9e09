"""The upstream HTTP client: httpx over our own connection pool, and bodies read straight
off the socket (``chunked``). Knows nothing of requests, reports or state."""
