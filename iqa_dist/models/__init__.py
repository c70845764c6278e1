"""HyperIQA on a timm backbone (`hyperiqa.py`, no distributed code) and where its pretrained
weights come from (`weights.py`).
"""
