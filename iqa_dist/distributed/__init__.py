"""What several processes need: the Accelerators iqa-dist builds, how work is shared out over
processes, and what is gathered across them.
"""
