"""pollguard: a reverse proxy that stops doomed polling traffic."""

__version__ = "0.1.0"
