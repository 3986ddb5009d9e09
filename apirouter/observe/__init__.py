"""Observation: the request context and the one ``finish`` step (``report``) that feeds
metrics, the access log, Sentry (capture, delivery, the event cap, traces), usage and the
failure windows from the same outcome."""
