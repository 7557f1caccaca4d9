"""`python -m modeling_parallelflow ...` is the `parallelflow` command."""

from .cli import main

raise SystemExit(main())
