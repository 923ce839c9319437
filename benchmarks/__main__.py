"""`python benchmarks/`: every benchmark in turn (`python benchmarks/NAME.py` runs one)."""

import os
import subprocess
import sys

BENCHMARKS = ("training_methods.py", "mnist.py", "autoattack.py", "cifar10.py")

if __name__ == "__main__":
    folder = os.path.dirname(os.path.abspath(__file__))
    for name in BENCHMARKS:
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, os.path.join(folder, name)], check=True)
