"""Pass-through: any ``/v1/`` path that no route template matches, forwarded as it came.

The OpenAI API has some 280 operations and Anthropic's dozens more; the built-in templates
carry the ones the router understands (model mapping, usage, retries). Everything else
goes through as-is, so assistants, vector stores, fine-tuning, evals, containers and the
rest work without a config entry. Three rules keep that safe:

- **Admin APIs stay out** (``/v1/organization/…``, ``/v1/projects/…``, and Anthropic's
  ``/v1/organizations/…``) unless a template names them: an operator key must never reach
  them by accident. The check runs on the decoded, normalised path, so an encoded
  ``..%2F`` cannot climb out of an allowed family into one.
- **Steps are refused**: a segment that is empty, ``.`` or ``..`` (also after a second
  decode), or that contains ``;``, is a 400; a path that steps anywhere once decoded
  (``/v1/x/..%2F..%2Forganization``) is not passed through (404). An upstream that
  decodes twice, or treats ``..;`` as ``..``, must not be walked outside the path the
  client named.
- **Labels stay bounded**: metrics, logs and Sentry name a passed-through request by its
  family from the fixed list below (``/v1/vector_stores/*``); any other path is ``other``.

A provider's ``passthrough`` is ``true`` (the default), ``false``, or a list of families.
"""

from __future__ import annotations

from urllib.parse import unquote

from apirouter import errors

# The API families of OpenAI's and Anthropic's APIs: the first segment after /v1/.
FAMILIES = frozenset(
    {
        # OpenAI
        "agents",
        "assistants",
        "audio",
        "batches",
        "chat",
        "chatkit",
        "completions",
        "containers",
        "content_provenance_checks",
        "conversations",
        "decisions",
        "embeddings",
        "evals",
        "files",
        "fine_tuning",
        "images",
        "live",
        "models",
        "moderations",
        "realtime",
        "responses",
        "safety",
        "skills",
        "threads",
        "uploads",
        "vaults",
        "vector_stores",
        "videos",
        "webhook_endpoints",
        "webhook_event_types",
        # Anthropic
        "complete",
        "deployment_runs",
        "deployments",
        "dreams",
        "environments",
        "memory_stores",
        "messages",
        "sessions",
        "tunnels",
        "user_profiles",
    }
)
# Admin APIs: never passed through, whatever ``passthrough`` says; a template may name them.
ADMIN_FAMILIES = frozenset({"organization", "organizations", "projects"})
OTHER = "other"
PREFIX = "/v1/"


def label(family: str) -> str:
    """The route label of a passed-through request: bounded by the fixed list."""
    return f"{PREFIX}{family}/*" if family in FAMILIES else OTHER


def family(raw_path: str) -> str | None:
    """The family a ``/v1/`` path belongs to, read from its decoded form; None when the
    decoded path would step out of where it seems to go (an encoded ``..%2F``): such a
    path is not passed through (404), so no upstream that decodes ``%2F`` can be walked
    into another family, admin ones included.

    Raises ``BadRequest`` for a raw segment that is empty, ``.`` or ``..`` (also after a
    second decode) or that holds ``;``.
    """
    segments = raw_path[len(PREFIX) :].split("/")
    for segment in segments:
        decoded = unquote(unquote(segment))
        if not segment or decoded in (".", "..") or ";" in decoded:
            raise errors.BadRequest(
                "Path segments must not be empty, '.' or '..' (also percent-encoded), nor "
                f"contain ';': {raw_path[:200]!r}."
            )
    parts = unquote(unquote(raw_path[len(PREFIX) :])).replace("\\", "/").split("/")
    if any(part in ("", ".", "..") for part in parts):
        return None
    return parts[0].lower()


def allowed(family_name: str, passthrough: bool | frozenset[str]) -> bool:
    """Whether a provider's ``passthrough`` setting lets ``family_name`` through."""
    if family_name in ADMIN_FAMILIES or passthrough is False:
        return False
    return passthrough is True or family_name in passthrough
