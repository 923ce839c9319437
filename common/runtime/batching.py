"""Splitting a number of examples into evaluation batches."""


def batch_bounds(num_examples, batch_size):
    """(start, end) of each batch, the last one possibly shorter, as the original scripts."""
    return [(first, min(first + batch_size, num_examples))
            for first in range(0, num_examples, batch_size)]
