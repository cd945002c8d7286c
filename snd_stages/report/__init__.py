"""What ``snd eval`` reports: metrics with bootstrap intervals over probe seeds and test units, paired deltas."""
