"""apirouter: an OpenAI-compatible API router for one LLM provider, with error tracking
and upstream-failure alerting that provably work."""

__version__ = "0.1.0"
