"""Dataset sources: each dataset's published files read into records (file, score, content
group, official split), and the embedded synthetic dataset. Decoding and caching are `data/`'s.
"""
