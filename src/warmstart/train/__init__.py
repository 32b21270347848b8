"""Training: one epoch loop (epoch), the three paths to it (paths, loop, cached), schedules,
checkpoints and exact resume, torchrun, and one run end to end (run)."""
