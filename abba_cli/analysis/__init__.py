"""Looking across runs: `abba compare` (compare/: budgets, the grid of runs, the table) and `abba inspect` (the
spectrum of each layer's update: spectra, its table and plot: spectra_report)."""
