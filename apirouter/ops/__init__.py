"""Operations: the Typer CLI (thin), start-up (``launch``), gunicorn workers, diagnostics
(``check-config``, ``show-config``) and the ``test-alert`` fire drill."""
