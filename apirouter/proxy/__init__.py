"""The proxy: the WSGI app, reading the client's request (``inbound``), attempts and
retries, the forward plan, relaying the answer, the capacity gate and health probes."""
