"""HiDe-Prompt's pieces: its prompt module and losses, its phases in the
trainer and their steps, and the building blocks they use (multi-centroid
class statistics, Gaussian-replay alignment, the one-epoch-lagged schedules
and the clipped Adam). `methods.hideprompt` is the method itself.
"""
