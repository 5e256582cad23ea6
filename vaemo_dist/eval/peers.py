"""Published results of peer methods on the audio-visual emotion benchmarks, for the comparison table
of a downstream run (`results.md`, written by vaemo_dist/eval/downstream.py).

Every number here is quoted from the paper named beside it (UAR and WAR in %, mean over the
benchmark's standard folds as the paper reports it); none was reproduced by this project. Add a row
only with its source. AVF-MAE++'s RAVDESS result is left out: its README shows it only inside a
figure, and it could not be checked as text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class PeerResult:
    method: str
    variant: str  # model size or setting, as the paper names it
    uar: float  # %
    war: float  # %
    source: str  # the citation
    url: str


HICMAE = ("Sun et al., HiCMAE, Information Fusion 2024 (arXiv 2401.05698)", "https://arxiv.org/abs/2401.05698")
AVF_MAE = ("Wu et al., AVF-MAE++, CVPR 2025",
           "https://openaccess.thecvf.com/content/CVPR2025/html/Wu_AVF-MAE_Scaling_Affective_Video_Facial_"
           "Masked_Autoencoders_via_Efficient_Audio-Visual_CVPR_2025_paper.html")

# The standard protocol of each benchmark, in words (what the peers' numbers were measured on).
PROTOCOLS = {
    "cremad": "5 subject-independent folds by actor",
    "ravdess": "6 subject-independent folds of 4 actors",
    "mafw": "the official 5 folds",
    "dfew": "the official 5 folds",
}

PEERS: dict[str, list[PeerResult]] = {
    "cremad": [PeerResult("HiCMAE", "base", 84.91, 84.89, *HICMAE),
               PeerResult("AVF-MAE++", "huge", 86.02, 85.95, *AVF_MAE)],
    "ravdess": [PeerResult("HiCMAE", "base", 87.96, 87.99, *HICMAE)],
    "mafw": [PeerResult("HiCMAE", "base", 42.65, 56.17, *HICMAE),
             PeerResult("AVF-MAE++", "huge", 46.05, 60.24, *AVF_MAE)],
    "dfew": [PeerResult("HiCMAE", "base", 63.76, 75.01, *HICMAE),
             PeerResult("AVF-MAE++", "huge", 66.88, 77.45, *AVF_MAE)],
}

_ALIASES = {"cremad": "cremad", "crema": "cremad", "ravdess": "ravdess", "mafw": "mafw", "dfew": "dfew"}


def benchmark(name: str | None) -> str | None:
    """The benchmark a dataset name means ("CREMA-D", "crema_d", "cremad" -> "cremad"), or None."""
    if not name:
        return None
    return _ALIASES.get(re.sub(r"[^a-z0-9]", "", name.lower()))


def peers_of(name: str | None) -> list[PeerResult]:
    """The quoted peer results for dataset `name`; empty for data that is no known benchmark."""
    key = benchmark(name)
    return list(PEERS.get(key, [])) if key else []
