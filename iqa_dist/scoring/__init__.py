"""Scoring a model: the one path from a split's images to per-image predictions and metrics,
`evaluate` (a model on a dataset) and `predict` (a model on files).
"""
