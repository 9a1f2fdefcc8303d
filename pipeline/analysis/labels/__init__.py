"""Automated interpretation: explanations from an OpenAI-compatible endpoint, scored by detection and fuzzing."""
