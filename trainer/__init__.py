"""The compact DDP MERT trainer: `torchrun trainer/pretrain.py` with model.py, data.py and configs/."""
