"""Configuration: settings from the environment, provider configs and their route templates,
the header policy, Redis URLs, and the shipped ``providers/*.json``. Imports nothing of
apirouter's but ``errors``: every other room reads its configuration from here."""
