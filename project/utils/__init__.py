"""What every layer may use: atomic files, the repository's paths, seeds, devices, signals, locks
and the progress line."""
