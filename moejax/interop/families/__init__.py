"""One module per Hugging Face family (moejax/interop/registry.py lists them)."""
