"""Where and how tensors are computed, below both training and evaluation: the device, precision,
memory format and image pipeline of a run (`Runtime`, which also builds its loaders), and the
processes of a distributed run (`Distributed`)."""
