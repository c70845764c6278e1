"""Measurement: `iqa-dist bench`'s figures (each measured side by side in one run), the kernel
audit of the training step, and the page `launch/gpu_bench.sh` leaves.
"""
