"""Experiments that reproduce the papers\x27 comparisons with reconfx."""
