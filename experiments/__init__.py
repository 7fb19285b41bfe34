"""Command-line entry points: `python -m experiments` trains one run."""
