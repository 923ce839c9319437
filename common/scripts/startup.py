"""TensorFlow's start-up lines, hidden from the scripts' users.

TensorFlow prints up to seven lines as it loads and first looks for devices: oneDNN's notice,
CUDA probing, and on a machine without a GPU a `failed call to cuInit` error. Several of them are
written before TensorFlow reads TF_CPP_MIN_LOG_LEVEL, so only catching the process's stderr hides
them. Which kernels run does not change (oneDNN stays as TensorFlow set it). `--tf_log` or
TF_CPP_MIN_LOG_LEVEL=0 shows them.
"""

import os
import sys
import tempfile

STARTUP_NOISE = (
    "All log messages before absl::InitializeLog() is called",
    "oneDNN custom operations are on",
    "Could not find cuda drivers",
    "failed call to cuInit",
    "Unable to register cuDNN factory",
    "Unable to register cuFFT factory",
    "Unable to register cuBLAS factory",
    "computation placer already registered",
    "TF-TRT Warning",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions",
)


def wants_tensorflow_log(argv=None, environ=None):
    """Whether the user asked for TensorFlow's own lines: `--tf_log` or TF_CPP_MIN_LOG_LEVEL=0."""
    argv = sys.argv if argv is None else argv
    environ = os.environ if environ is None else environ
    return "--tf_log" in argv or "--tf_log=true" in argv or \
        environ.get("TF_CPP_MIN_LOG_LEVEL") == "0"


def is_noise(line):
    return any(marker in line for marker in STARTUP_NOISE)


def load_tensorflow_quietly():
    """Imports TensorFlow and lists the devices with stderr caught, then writes back every line
    caught but the start-up noise. Does nothing where TensorFlow is loaded already or the user
    asked for its lines."""
    if "tensorflow" in sys.modules or wants_tensorflow_log():
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            lines = caught.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not is_noise(line)))
            sys.stderr.flush()
