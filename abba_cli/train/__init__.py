"""`abba train` (recipe.run_training) and `abba validate` (validate.validate_run), torchtune-style: setup steps in
dependency order (setup), one loop (loop) over the run object (context), the loss (loss), validation
(validation), checkpoint and resume state (checkpoint, state), and the end of the run (finish)."""
