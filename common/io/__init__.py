"""Files in and out: writing whole-or-nothing, downloads, released models, checkpoints (the TF1
ones included). May import `common.runtime`."""
