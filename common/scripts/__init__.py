"""The challenge scripts' side: absl flags, the JSON config read and checked into typed settings,
the `Challenge` description, and one driver per script. The only code that prints, parses flags or
picks file names; may import all of `common`. Importing it loads TensorFlow without its start-up
lines (startup.py)."""

from common.scripts import startup

startup.load_tensorflow_quietly()
