"""Training: the step (batches, losses, the guard, the Trainer), the optimization recipe, the
loop (`loop.train`), model selection, what a launch resumes, and the run's records.
"""
