"""Pipeline stages (`mert_pipeline.stages`): one module per stage, each plain logic over one task (see
`mert_pipeline.executor`). The folder sits beside `mert_pipeline/` in the checkout and installs as
`mert_pipeline.stages`."""

if __name__ != "mert_pipeline.stages":  # the folder is mapped into the package; never import it bare
    raise ImportError(
        "import mert_pipeline.stages, not stages: this folder is part of the mert_pipeline package"
    )
