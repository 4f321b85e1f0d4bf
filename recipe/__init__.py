"""recipe: turn a CALM assistant's dialogue tests into a small, fast, self-hosted command generator."""

__version__ = "0.1.0"
