"""Building blocks of the challenge networks: CPU-tuned Conv2D and Dense layers and the CIFAR-10
original's synchronized batch normalization. May import `common.runtime`."""
