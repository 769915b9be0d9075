"""The ``surgery`` command line (``surgery.cli.main:main``); pipelines live in :mod:`surgery.cli.commands`."""
