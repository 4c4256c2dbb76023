"""mert-pipeline: raw music -> pseudo-labelled WebDataset shards -> MERT-style pretraining."""

__version__ = "0.1.0"
