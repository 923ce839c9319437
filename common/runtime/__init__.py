"""Where and how the work runs: devices and strategies, numeric precision, seeded random streams,
batch bounds, and the one error type shown to users as a line. Imports nothing else of `common`."""
