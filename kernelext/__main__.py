"""`python -m kernelext serve ...` (the `kernelext` console script)."""

from kernelext.server.cli import main

raise SystemExit(main())
