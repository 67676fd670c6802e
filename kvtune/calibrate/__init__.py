"""kvtune.calibrate."""
