"""Training: one run end to end (run: build, open the run, fit, calibrate, refit, test, write);
`paths` decides the training path once and `fit` maps it to its trainer: cached features or
activations (`cached`, `head`), or images (`images`); every path is an epoch loop that the one
driver runs (`driver`), one epoch at a time (`epoch`, `steps`); the head's settings, pull and teacher
(`pull`), the logistic probe (`probe`), cross-fitting (`cross_fit`), schedules, mixup, checkpoints and
exact resume (`checkpoint`), history, lr-find."""
