"""What comes after training: per-feature analysis (analyze.py: statistics, exact top-k examples, interval samples),
the static feature browser, spliced evaluation and steering. Nothing is imported here, so that importing one part
does not load the others (or the language model)."""
