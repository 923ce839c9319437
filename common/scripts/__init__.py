"""The challenge scripts' side: absl flags, the JSON config read and checked into typed settings,
the `Challenge` description, and one driver per script. The only code that prints, parses flags or
picks file names; may import all of `common`."""
