"""Lightning callbacks; ReparamCallback converts the trained model to its deploy form, EMA averages
the weights."""
# Imported with the package (the CLI imports callbacks.reparam) so that the command line's short
# class name resolves: --trainer.callbacks+=EMA
from callbacks.ema import EMA

__all__ = ["EMA"]
