"""``python -m surgery``: the same command line as the ``surgery`` script."""
from surgery.cli.main import main

raise SystemExit(main())
