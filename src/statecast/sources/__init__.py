"""Sources: external systems whose changes statecast follows (docs/postgres.md)."""
