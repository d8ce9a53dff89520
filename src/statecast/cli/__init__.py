"""The ``statecast`` command line: ``main`` (click), ``commands`` and ``demo``."""
