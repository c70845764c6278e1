"""HyperIQA on a timm backbone (`hyperiqa.py`, no distributed code), where its pretrained
weights come from (`weights.py`), and the published HyperIQA weight formats (`imports.py`).
"""
