"""From dataset files to device batches: decode, cache (build) and store (read), splits, the
batch plan, device augmentation, the test protocol's patches, feeding files to `predict`, and a
run's datasets loaded together. Import-light: decode worker processes import `data.decode`
without torch.
"""
