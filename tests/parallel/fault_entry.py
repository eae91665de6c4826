"""Test-only entry point: `python fault_entry.py STEP RANK <vmoe args>` runs
`vmoe <args>` with rank RANK SIGKILLed just before it trains step STEP
(0-based) on the first attempt of a torchrun job, to test recovery with
--max-restarts. The fault injection lives here, not in the library."""
from __future__ import annotations

import os
import signal
import sys

from vmoe_torch.cli.main import main
from vmoe_torch.train import trainer as trainer_module


def install(at_step: int, rank: int) -> None:
    original = trainer_module.Trainer._train_step

    def train_step(self, step, *args, **kwargs):
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if step == at_step and self.rank == rank and first_attempt:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, step, *args, **kwargs)

    trainer_module.Trainer._train_step = train_step


if __name__ == "__main__":
    install(int(sys.argv[1]), int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
