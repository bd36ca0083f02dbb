"""The foundation every other part of cmx builds on: config schemas, errors, metric names and
trial states, paths and file helpers. It imports no other part of cmx, and nothing heavy."""
