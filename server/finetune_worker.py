"""The trainer process of a fine-tuning job: train-adapter's own code, its progress written as JSON lines.

    python -m server.finetune_worker PROGRESS_FILE TRAIN_ADAPTER_ARGS...

It exits when the server that started it goes away, so a killed server never leaves a trainer running.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(3)


def main(argv: list[str] | None = None) -> int:
    progress_path, *train_args = sys.argv[1:] if argv is None else argv
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    from scripts import train_adapter  # after the watchdog: importing torch takes seconds

    with open(progress_path, "a", encoding="utf-8") as progress:

        def report(event: dict) -> None:
            progress.write(json.dumps(event) + "\n")
            progress.flush()

        return train_adapter.main(train_args, progress=report)


if __name__ == "__main__":
    raise SystemExit(main())
