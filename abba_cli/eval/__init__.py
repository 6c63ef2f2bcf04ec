"""`abba eval` (evaluate.run_eval): tasks and protocols (tasks), which model a run means and loading it (target),
greedy generation (generate), answer extraction and scoring (scoring), and each task's results folder (results)."""
