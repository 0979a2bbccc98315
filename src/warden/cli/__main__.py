"""``python -m warden.cli``."""

from warden.cli._app import main

main()
