"""saepipe: corpus -> extract -> store -> train -> analysis."""

__version__ = "0.1.0"
