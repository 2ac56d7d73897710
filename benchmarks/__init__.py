"""Speed benchmarks: each module prints ratios measured in one run (``python -m benchmarks`` runs all)."""
