"""``python -m dptrain ARGS`` is ``dptrain ARGS``."""

from dptrain.cli import main

raise SystemExit(main())
