"""Label sets as the shard plan reads them: labels.parquet as sorted columns joined by id."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mert_pipeline.labels import label_index
from mert_pipeline.layout import Workdir, id_numbers


def test_label_index_finds_ids_marks_paths_outside_and_keeps_the_last_of_duplicates(tmp_path: Path) -> None:
    label_set = Workdir(tmp_path).labels("km")
    label_set.path.mkdir(parents=True)
    ids = ["00000000000000bb", "00000000000000aa", "not-an-id", "00000000000000cc", "00000000000000aa"]
    relpaths = ["00/00000000000000bb.npy", "aa.npy", "x.npy", "../../../etc/cc.npy", "00/a2.npy"]
    table = pa.table(
        {
            "id": ids,
            "relpath": relpaths,
            "config_hash": ["h1", "h1", "h1", "h1", "h2"],
            "num_samples": pa.array([100, 200, 300, 400, 500], pa.int64()),
        }
    )
    pq.write_table(table, label_set.manifest)
    index = label_index(label_set)
    assert len(index.ids) == 4  # the invalid id is left out: no manifest id can match it
    query, _ = id_numbers(
        pa.array(["00000000000000aa", "00000000000000bb", "00000000000000cc", "00000000000000dd"])
    )
    at = index.find(query)
    assert at[3] == -1 and (at[:3] >= 0).all()
    assert index.relpath[int(at[0])].as_py() == "00/a2.npy"  # of two rows with one id, the last
    assert index.relpath_ok[at[:3]].tolist() == [True, True, False]  # ../../../etc is outside the folder
    same = index.matches(at, np.array([500, 100, 400, 0]), "h1")
    assert same.tolist() == [False, True, False, False]  # aa: other config; cc: outside; dd: no labels
    assert index.matches(at, np.array([500, 100, 400, 0]), "h2").tolist() == [True, False, False, False]
    assert index.get("00000000000000aa") == ("00/a2.npy", "h2", 500)
    assert index.get("00000000000000dd") is None and index.get("../../pwned") is None
