"""Evaluation: official A-OKVQA metrics, answer-to-choice mapping, plots (no heavy imports here)."""
