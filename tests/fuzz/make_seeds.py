"""Write each target's seed corpus (``corpus/NAME/seed-N``) from its ``seeds()``: run after a
protocol change so the seeds stay valid inputs. Deterministic: the same files every time."""

from __future__ import annotations

import hashlib
import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TARGETS = ["messages", "responder", "cookie", "mesh_control", "relay_frames", "uapi", "config"]


def main() -> None:
    for name in TARGETS:
        module = importlib.import_module(f"fuzz_{name}")
        out = HERE / "corpus" / name
        out.mkdir(parents=True, exist_ok=True)
        for old in out.glob("seed-*"):
            old.unlink()
        for data in module.seeds():
            digest = hashlib.sha256(data).hexdigest()[:12]
            (out / f"seed-{digest}").write_bytes(data)
        print(f"{name}: {len(list(out.iterdir()))} seeds")


if __name__ == "__main__":
    main()
