"""tools/evaluate.py killed mid-way, as by the OOM killer or a pre-empted node: after `batches`
batches are cached, the next batch's line is half written, then the process SIGKILLs itself
(no cleanup, no flush of anything else)."""

import os
import signal

from megatron_emu.evaluation.cache import PredictionCache


def kill_after(batches: int) -> None:
    real, calls = PredictionCache.add, [0]

    def add(self, records):
        if calls[0] == batches:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write('{"key": "' + records[0]["key"] + '", "predic')  # torn mid-line
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        calls[0] += 1
        return real(self, records)

    PredictionCache.add = add

