"""Many runs and their comparison: sweep grids over splits or seeds, paired statistics, the
cross-dataset evaluation, and `report`'s tables and plots.
"""
