"""Test-only entry point: `python fault_entry.py WHERE STEP RANK <vmoe args>`
runs `vmoe <args>` with rank RANK SIGKILLed on the first attempt of a
torchrun job:

- WHERE=step: just before it trains step STEP (0-based), to test recovery
  with --max-restarts;
- WHERE=shard: while it writes its shard of the sharded checkpoint of step
  STEP (a torn file is left behind, as a kill mid-write leaves it);
- WHERE=commit: after every shard and DCP's .metadata of checkpoint STEP are
  written, just before the directory would be renamed into place.

The fault injection lives here, not in the library."""
from __future__ import annotations

import os
import signal
import sys

from vmoe_torch.cli.main import main
from vmoe_torch.train import checkpoint as checkpoint_module
from vmoe_torch.train import trainer as trainer_module


def _first_attempt() -> bool:
    return os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install(where: str, at_step: int, rank: int) -> None:
    tag = f"step_{at_step:08d}"
    if where == "step":
        original = trainer_module.Trainer._train_step

        def train_step(self, step, *args, **kwargs):
            if step == at_step and self.rank == rank and _first_attempt():
                _kill()
            return original(self, step, *args, **kwargs)

        trainer_module.Trainer._train_step = train_step
    elif where == "shard":
        save = checkpoint_module.sharded.save

        def torn_save(path, state):
            if tag in path and _rank() == rank and _first_attempt():
                with open(os.path.join(path, f"__{rank}_0.distcp"), "wb") as f:
                    f.write(b"\x80" * 4096)
                _kill()
            return save(path, state)

        checkpoint_module.sharded.save = torn_save  # type: ignore[assignment]
    elif where == "commit":
        commit = checkpoint_module.commit_directory

        def killed_commit(tmp, path, overwrite=False):
            if path.endswith(tag) and _rank() == rank and _first_attempt():
                assert os.path.exists(os.path.join(tmp, ".metadata")), "DCP has finished writing"
                _kill()
            return commit(tmp, path, overwrite)

        checkpoint_module.commit_directory = killed_commit  # type: ignore[assignment]
    else:
        raise ValueError(where)


if __name__ == "__main__":
    install(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    sys.exit(main(sys.argv[4:]))
