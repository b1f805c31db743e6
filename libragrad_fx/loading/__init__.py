"""Models by name, checkpoints, pretrained weights and their input preprocessing."""
