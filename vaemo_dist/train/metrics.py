"""Metrics out of the loop: a JSONL file, wandb, and a rank-0 progress bar."""

from __future__ import annotations

import json
import logging
import math
import os
import time
import uuid
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)


class MetricsLogger:
    """Rank 0 writes; other ranks hold a logger that does nothing."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        total_steps: int,
        start_step: int,
        config: dict[str, Any],
        wandb_mode: str = "auto",
        wandb_project: str = "vaemo",
        wandb_entity: str = "",
        run_name: str = "",
    ) -> None:
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.bar = None
        self.wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                        mininterval=1.0, smoothing=0.1)
        self.wandb = _start_wandb(run_dir, wandb_mode, wandb_project, wandb_entity, run_name, config)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines from steps that the resumed run will do again."""
        if not self.path.exists():
            return
        kept = [ln for ln in self.path.read_text().splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= step]
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # NaN and inf become null: strict JSON readers (jq, JavaScript, pandas) reject them.
        finite = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
        record = {"step": step, "time": time.time(), **finite}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def advance(self, n: int, postfix: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()


def _start_wandb(run_dir: Path, mode: str, project: str, entity: str, name: str, config: dict[str, Any]):
    if mode == "disabled":
        return None
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    import wandb

    id_file = run_dir / "wandb_id"  # a resumed run continues the same wandb run
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=project, entity=entity or None, name=name or None, id=run_id,
                      resume="allow", mode=mode, dir=str(run_dir), config=config)
