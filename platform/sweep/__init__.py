"""Sweeps on Ray Tune: the Tuner, the trial function, schedulers, Tune callbacks and results."""

import time

# When this process first imported a sweep module. A fresh Ray worker does so to unpickle the trial
# function, so a trial can report how long its imports took (time/setup/imports_s).
IMPORTED_AT = time.perf_counter()
