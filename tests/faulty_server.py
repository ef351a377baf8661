"""`python tests/faulty_server.py ARGS`: the serve command with faults injected into the model runner,
for tests/test_server_faults.py. A step that schedules a prompt starting with STEP_FAULT raises an
out-of-memory error (the step's requests fail, the engine serves on); one with FATAL_FAULT raises the
error of a lost tensor-parallel rank (the engine cannot serve on). With --engine-process the faults
are injected in the engine's process too."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEP_FAULT = [0, 3999, 3999, 3999]
FATAL_FAULT = [0, 3998, 3998, 3998]


def inject() -> None:
    import torch

    from deepseek_v2.engine.model_runner import ModelRunner
    from deepseek_v2.engine.workers import WorkerError

    launch = ModelRunner.launch

    def faulty_launch(self, sched):
        for item in sched.scheduled:
            head = item.seq.prompt_token_ids[:len(STEP_FAULT)]
            if head == STEP_FAULT:
                raise torch.OutOfMemoryError("injected: CUDA out of memory")
            if head == FATAL_FAULT:
                raise WorkerError("injected: tensor-parallel rank 1 exited (code -9)")
        return launch(self, sched)

    ModelRunner.launch = faulty_launch


if __name__ == "__mp_main__":  # the engine process of --engine-process imports this file under that name
    inject()

if __name__ == "__main__":
    inject()
    from deepseek_v2.server.cli import main
    sys.exit(main(sys.argv[1:]))
