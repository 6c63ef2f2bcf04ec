"""abba-cli: fine-tune, evaluate, merge and export ABBA adapters."""

__version__ = "0.1.0"
