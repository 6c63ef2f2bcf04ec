"""One-off studies behind benchmarks/RESULTS.md, kept to re-run: see experiments/README.md."""

from pathlib import Path

# Where the studies write by default; what RESULTS.md cites from here is committed.
RESULTS_DIR = Path(__file__).resolve().parent / "results"
