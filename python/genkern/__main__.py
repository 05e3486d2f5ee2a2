"""`python -m genkern bench`: the same command as the `genkern` console script."""

from .cli import main

raise SystemExit(main())
