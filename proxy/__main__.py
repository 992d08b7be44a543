"""`python -m proxy` is the `pollguard` command."""

from proxy.cli import main

raise SystemExit(main())
