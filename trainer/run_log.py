"""The run's metrics log: ``metrics.jsonl`` and TensorBoard, and its trimming on resume."""

from __future__ import annotations

import json
import os


class MetricsLog:
    """metrics.jsonl and TensorBoard, written by rank 0 only."""

    def __init__(self, out: str, enabled: bool) -> None:
        self.enabled = enabled
        self.path = os.path.join(out, "metrics.jsonl")
        self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out, "tb"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
        step = record.get("step", 0)
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                self.tb.add_scalar(f"{record['kind']}/{key}", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def drop_records_after(path: str, step: int, epoch: int) -> None:
    """Forget what a killed run logged after its last checkpoint: a resumed run logs it again."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as fh:
        lines = [ln for ln in fh if ln.strip()]
    keep = []
    for ln in lines:
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue  # a line cut short by the kill
        if rec.get("step", 0) <= step and rec.get("epoch", 0) < epoch:
            keep.append(ln if ln.endswith("\n") else ln + "\n")
    if len(keep) != len(lines):
        with open(path + ".tmp", "w", encoding="utf-8") as fh:
            fh.writelines(keep)
        os.replace(path + ".tmp", path)
