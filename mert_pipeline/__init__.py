"""mert-pipeline: raw music -> pseudo-labelled WebDataset shards -> MERT-style pretraining.

The Python API (`mert_pipeline.pipeline`), in five lines:

    from mert_pipeline import PipelineConfig, run_pipeline

    config = PipelineConfig(roots=["/data/music"], workdir="work", teachers=("rvq", "kmeans500"))
    report = run_pipeline(config)
    print(report.shards, report.hours, report.ok)

Where each concept lives: the frame grid in `grid`, the WORKDIR layout in `layout`, the shard format in
`shards`, each teacher in `teachers/`, the stages in `stages/`, manifest records in `manifests/`, the
trainer in `trainer/`, the command line in `cli/`.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {
    "PipelineConfig": "mert_pipeline.pipeline",
    "PipelineReport": "mert_pipeline.pipeline",
    "PipelineError": "mert_pipeline.pipeline",
    "StageFailed": "mert_pipeline.pipeline",
    "run_pipeline": "mert_pipeline.pipeline",
    "ExecutorConfig": "mert_pipeline.executor",
    "ConsoleProgress": "mert_pipeline.progress",
    "Workdir": "mert_pipeline.layout",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    """The API's names, imported on first use: `import mert_pipeline` stays cheap for worker processes."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'mert_pipeline' has no attribute {name!r}")
