"""megalysses: GPT-style training on very long sequences with Ulysses sequence parallelism on a 4D mesh."""

__version__ = "0.1.0"
