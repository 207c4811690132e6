"""Command-line tools that sit on top of the runtime (checkpoint conversion, inspection)."""
