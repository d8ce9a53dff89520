"""The protocol and state core: pure, no I/O (docs/architecture.md)."""
