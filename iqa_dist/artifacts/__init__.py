"""The on-disk formats that training writes and scoring and experiments read: the model card
(an exported model) and the run directory.
"""
