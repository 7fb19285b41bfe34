"""Initialising a model from other runs: sparse upcycling, growing experts, adapter bases.

The parameter surgery (`upcycle`, `grow`) is pure functions on parameter
pytrees; `sources` reads run directories; `hooks` is what the trainer calls.
"""
