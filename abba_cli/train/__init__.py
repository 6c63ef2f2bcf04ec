"""`abba train` (pipeline.run_training) and `abba validate` (plan.validate_run), torchtune-style: setup steps in
dependency order (setup), one loop (loop) over the run object (context), the loss (loss), validation loss
(val_loss), checkpoint and resume state (checkpoint, state), and the end of the run (finish)."""
