"""On-disk cache of finished sensitivity measurements: append-only JSON lines, one file per fingerprint and rank.

Layout (``<workdir>/analysis/``)::

    cache-<fingerprint>.jsonl          # written by a single process, or by rank 0 under torchrun
    cache-<fingerprint>.rank<r>.jsonl  # written by rank r > 0

Each line is one finished record, appended and flushed as soon as it is measured, so an interrupted run loses
at most the measurement in progress. Two kinds of record:

* ``{"record": "measure", "fqn", "kind": "weights"|"activations", "bits", "metric", "value", "evaluations",
  "seconds", "rank"}``: one layer quantized at one candidate bit width;
* ``{"record": "sizes", "fqn", "num_weights", "act_elements", "macs"}``: the layer's size and compute.

Readers merge every file of a fingerprint and skip a torn last line (a process killed mid-write).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

__all__ = ["MeasurementCache", "fingerprint_of", "measure_key"]

_RECORDS = ("measure", "sizes")


def fingerprint_of(payload: Mapping) -> str:
    """Short stable hash (16 hex digits) of a JSON-serialisable mapping."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def measure_key(fqn: str, kind: str, bits: int, metric: str) -> tuple[str, str, int, str]:
    """The identity of one measurement (what a cache line stands for)."""
    return (fqn, kind, int(bits), metric)


class MeasurementCache:
    """Append-only JSON-lines cache of one analysis fingerprint.

    Args:
        folder: the analysis folder (``<workdir>/analysis``).
        fingerprint: hash of everything a measurement depends on; a different one starts an empty cache.
        rank: this process's rank; each rank appends to its own file so ranks never interleave writes.
    """

    def __init__(self, folder: str | Path, fingerprint: str, rank: int = 0):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.rank = rank
        suffix = "" if rank == 0 else f".rank{rank}"
        self.path = self.folder / f"cache-{fingerprint}{suffix}.jsonl"
        self._checked_tail = False

    def files(self) -> list[Path]:
        """Every cache file of this fingerprint (all ranks, all earlier runs), in a stable order."""
        return sorted(self.folder.glob(f"cache-{self.fingerprint}*.jsonl"))

    def _lines(self) -> Iterator[dict]:
        for path in self.files():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # torn line of an interrupted write
                    if isinstance(rec, dict) and rec.get("record") in _RECORDS and "fqn" in rec:
                        yield rec

    def load(self) -> tuple[dict[tuple, dict], dict[str, dict]]:
        """All finished records: ``({measure_key: record}, {fqn: sizes record})``; the first copy of a key wins."""
        measures: dict[tuple, dict] = {}
        sizes: dict[str, dict] = {}
        for rec in self._lines():
            if rec["record"] == "sizes":
                sizes.setdefault(rec["fqn"], rec)
            else:
                try:
                    key = measure_key(rec["fqn"], rec["kind"], rec["bits"], rec["metric"])
                except (KeyError, TypeError, ValueError):
                    continue
                measures.setdefault(key, rec)
        return measures, sizes

    def append(self, record: Mapping) -> None:
        """Write one record as one line and flush it to disk before returning."""
        self.folder.mkdir(parents=True, exist_ok=True)
        data = (json.dumps(dict(record), sort_keys=True) + "\n").encode()
        with open(self.path, "ab") as f:
            if not self._checked_tail:
                # A process killed mid-write leaves a line without its newline: start on a fresh line so the
                # torn fragment stays one unreadable line instead of corrupting this record too.
                if f.tell() > 0:
                    with open(self.path, "rb") as r:
                        r.seek(-1, os.SEEK_END)
                        if r.read(1) != b"\n":
                            data = b"\n" + data
                self._checked_tail = True
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
