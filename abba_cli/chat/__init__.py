"""`abba chat`: a terminal conversation with a trained run (or a plain model) in the run's own prompt format."""
