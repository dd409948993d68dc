"""Measuring: the CPU and its hardware profile, timing, accuracy metrics, compute limits, op
profiles, scaling, session tuning, per-node quantization sensitivity."""
