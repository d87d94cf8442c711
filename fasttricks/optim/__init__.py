"""Drop-in replacements for torch.optim.SGD / Adam / AdamW, plus SGDW."""
from fasttricks.optim.adam import Adam, AdamW
from fasttricks.optim.sgd import SGD, SGDW

__all__ = ["SGD", "SGDW", "Adam", "AdamW"]
