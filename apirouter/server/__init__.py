"""The embedded server: waitress, hardened (``protocol``, ``channel``), run and stopped
gracefully (``runner``), plus the admin listener for probes and scraping."""
