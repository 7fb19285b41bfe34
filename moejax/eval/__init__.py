"""Scoring trained or converted models: per-sequence negative log-likelihood."""

from moejax.eval.nll import Record, Scores, read_jsonl, score

__all__ = ["Record", "Scores", "read_jsonl", "score"]
