"""Scoring: feature models, distribution metrics and the scorers trainers use to keep their best checkpoint."""
