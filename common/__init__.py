"""Code shared by the MNIST and CIFAR-10 challenges."""
