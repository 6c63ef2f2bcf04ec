"""The run directory: its layout and reading (layout), which run a command means (latest), a run's adapter
files (adapter_files), and the directory while training writes it (training_dir)."""
