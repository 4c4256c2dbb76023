"""Manifest record types and their streaming readers and writers."""

from manifests.io import (
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
from manifests.records import (
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
