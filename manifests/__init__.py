"""Manifest record types and their streaming readers and writers (`mert_pipeline.manifests`)."""

from mert_pipeline.manifests.io import (
    FairseqTsvWriter,
    ManifestWriter,
    RejectsWriter,
    count_records,
    iter_batches,
    iter_records,
    iter_rejects,
    manifest_root,
    read_fairseq_tsv,
)
from mert_pipeline.manifests.records import (
    REJECT_REASONS,
    AudioRecord,
    LabelRecord,
    RecordError,
    Reject,
    ResampledRecord,
    assign_split,
)

__all__ = [
    "REJECT_REASONS",
    "AudioRecord",
    "FairseqTsvWriter",
    "LabelRecord",
    "ManifestWriter",
    "RecordError",
    "Reject",
    "RejectsWriter",
    "ResampledRecord",
    "assign_split",
    "count_records",
    "iter_batches",
    "iter_records",
    "iter_rejects",
    "manifest_root",
    "read_fairseq_tsv",
]

if __name__ != "mert_pipeline.manifests":  # the folder is mapped into the package; never import it bare
    raise ImportError(
        "import mert_pipeline.manifests, not manifests: this folder is part of the mert_pipeline package"
    )
