"""Sweeps: options, planning, the job that runs one run, executors, progress, the data world."""
