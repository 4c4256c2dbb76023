"""The compact DDP MERT trainer (`mert_pipeline.trainer`): `torchrun trainer/pretrain.py` in a checkout, or
`torchrun -m mert_pipeline.trainer.pretrain` / `mert-pretrain` when installed; model.py, data.py, configs/."""

if __name__ != "mert_pipeline.trainer":  # the folder is mapped into the package; never import it bare
    raise ImportError(
        "import mert_pipeline.trainer, not trainer: this folder is part of the mert_pipeline package"
    )
