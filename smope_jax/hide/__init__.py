"""HiDe-Prompt's trainer side: work in progress, not yet wired.

Pure building blocks for the trainer phases of HiDe-Prompt (multi-centroid
class statistics, Gaussian-replay alignment of the task-identity classifier
and of the head, the one-epoch-lagged schedules and the clipped Adam). No
trainer phase, config or method calls them yet; see
docs/hideprompt_trainer_port.md for what remains.
"""
