"""The library behind claims.py and the runbook's scales (experiments.py --scale)."""
