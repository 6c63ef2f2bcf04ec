"""Shipping a trained run: `abba merge` (merge), `abba export` (export; rank-K truncation in truncate), and the
logit self-check they all run (logit_check)."""
