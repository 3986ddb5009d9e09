"""``python -m apirouter`` runs the CLI."""

from apirouter.ops.cli import main

main()
