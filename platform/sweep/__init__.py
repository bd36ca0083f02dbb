"""Sweeps on Ray Tune: the Tuner, the trial function, schedulers, Tune callbacks and results."""
