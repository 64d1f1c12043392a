"""The results store: run records, claims on runs, per-image predictions. Never imports torch."""
