"""``python -m apirouter`` runs the CLI."""

from apirouter.cli import main

main()
