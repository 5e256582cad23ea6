"""Dataset adapters: a corpus in its distributed layout -> the clips vaemo-shard converts.

`vaemo-shard --dataset NAME ROOT --out OUT [--dataset-option KEY=VALUE ...]`. One module per corpus,
all behind `DATASETS` (name -> adapter); the interface and its helpers are in `base.py`:
`get_dataset(name).inputs(root, **options) -> Listing` (inputs: MediaInputs with label = class name,
speaker, extra = the dataset's ids, `dataset`, `fold`; skipped: what was not used, with reason and
kind). `class_names` gives the label order vaemo-shard keeps in manifest.json.

    voxceleb2   <split>/mp4/<id>/<youtube id>/<nnnnn>.mp4 (+ aac/ .m4a); speaker; no labels
    cremad      VideoFlash/*.flv + AudioWAV/*.wav; 6 classes; 5 folds by actor; known broken clips
    ravdess     Actor_NN/<7 fields>.mp4; 8 classes; 6 folds of 4 actors
    mafw        the clips + Train & Test Set/single/.../set_N/{train,test}.txt; 11 classes; official 5 folds
    dfew        the clips + EmoLabel_DataSplit/{train,test}(single-labeled)/set_N.csv; 7 classes; 5 folds
    csv         a folder of videos or a CSV manifest (data/sources.py media_inputs), audio/fps columns
    hicmae-csv  HiCMAE's lists: `<frames folder> <wav> <label index>` per line, split<NN>/ folders
"""

from __future__ import annotations

from vaemo_dist.data.datasets.base import SKIP_KINDS, Dataset, DatasetError, Listing, clip_key
from vaemo_dist.data.datasets.cremad import CremaD
from vaemo_dist.data.datasets.csv import Csv
from vaemo_dist.data.datasets.dfew import Dfew
from vaemo_dist.data.datasets.hicmae_csv import HicmaeCsv
from vaemo_dist.data.datasets.mafw import Mafw
from vaemo_dist.data.datasets.ravdess import Ravdess
from vaemo_dist.data.datasets.voxceleb2 import VoxCeleb2

DATASETS: dict[str, Dataset] = {d.name: d for d in (VoxCeleb2(), CremaD(), Ravdess(), Mafw(), Dfew(), Csv())}


def dataset_names() -> list[str]:
    """The registered adapters' names."""
    return [*DATASETS, HicmaeCsv.name]


def get_dataset(name: str) -> Dataset:
    """The adapter called `name` (hicmae-csv: a fresh one, since its classes come from its options)."""
    if name == HicmaeCsv.name:
        return HicmaeCsv()
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; one of {dataset_names()}")
    return DATASETS[name]


__all__ = ["DATASETS", "SKIP_KINDS", "Dataset", "DatasetError", "Listing", "clip_key", "dataset_names",
           "get_dataset"]
