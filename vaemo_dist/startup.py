"""The start-up every entry point shares: the launchers (`vaemo_dist.launch.run_stage`, fine-tuning) and
every console script's `main()`.

* `setup_logging`: root logging with the secret mask (`vaemo_dist.secrets.install_log_masking`) on every
  handler, so that no key from the environment reaches a log line, whatever library writes it.
* `fail` / `refuse`: a known input error (a config, a folder of the user's, a missing export, ...) is
  one line on stderr, said once per launch (global rank 0), with its secrets masked, and exit code 2.
* `entry_point`: a console script's `main` with both: logging set up before anything runs, and
  `ConfigError`, `FolderInUseError` (and the errors it names) turned into `fail`.

Layer 0 (it imports only config, fsutil and secrets): the `main()` of any module may use it.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import NoReturn

from vaemo_dist.config import ConfigError
from vaemo_dist.fsutil import FolderInUseError
from vaemo_dist.secrets import install_log_masking, mask_secrets

# Libraries whose INFO lines say nothing a user acts on.
NOISY_LOGGERS = ("DeepSpeed", "deepspeed", "torch.distributed", "urllib3", "httpx")
CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
RANK_FORMAT = "%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s"
# The errors every entry point may meet and reports as exit 2 (config and the user's folders).
INPUT_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FolderInUseError)
# DeepSpeed's ZeRO code (the ZeRO-1/2 step's all_gather_dp_groups, ZeRO-3's parameter all-gather and
# gradient reduce-scatter) calls torch.distributed.all_gather_into_tensor and reduce_scatter_tensor
# through deepspeed.comm, aliases torch 2.13 deprecates: a FutureWarning per rank and call site, which
# only DeepSpeed can act on. Only those two messages are ignored (they are attributed to torch's
# c10d_logger wrapper, not to DeepSpeed, so the message is what identifies them); every other warning
# still shows.
DEPRECATED_BY_DEEPSPEED = (r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                           r"is deprecated")


def env_rank() -> int:
    """This process's global rank as the launcher set it (RANK; 0 when unset: one process)."""
    return int(os.environ.get("RANK", "0"))


def setup_logging(rank: int | None = None) -> None:
    """Root logging for an entry point, with the secret mask on every root handler.

    `rank` None: a console script (one process): INFO and above, added only where the root logger has
    no handler yet (a caller's own logging, e.g. a test's capture, stays as it is). `rank` given: a
    process of a launch: INFO on rank 0 and WARNING elsewhere, `[rank N]` in every line, replacing
    whatever handlers a library installed."""
    if rank is None:
        logging.basicConfig(level=logging.INFO, format=CONSOLE_FORMAT, datefmt="%H:%M:%S")
    else:
        logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                            format=RANK_FORMAT.format(rank=rank), datefmt="%H:%M:%S", force=True)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=DEPRECATED_BY_DEEPSPEED, category=FutureWarning)
    install_log_masking()


def say(message: str) -> None:
    """`message` on stderr, secrets masked, from global rank 0 only (RANK "0" or unset)."""
    if env_rank() == 0:
        print(mask_secrets(message), file=sys.stderr, flush=True)


def fail(message: str) -> int:
    """Report a known input error once (`say`) and return the exit code 2. Every rank of a launch
    finds the same problem; the ranks other than 0 wait a moment before they return: launchers end
    every process once one exits, and rank 0 should have said why by then."""
    say(message)
    if env_rank() != 0:
        time.sleep(3)
    return 2


def refuse(message: str) -> NoReturn:
    """`fail(message)`, then leave the process with its exit code 2."""
    sys.exit(fail(message))


def entry_point(prefix: str, errors: tuple[type[BaseException], ...] = ()) -> Callable[
        [Callable[[list[str] | None], int]], Callable[[list[str] | None], int]]:
    """Decorate a console script's `main(argv) -> int`: logging is set up (`setup_logging`) before it
    runs, and a ConfigError, a FolderInUseError or one of `errors` leaving it is said as
    `<prefix>: <error>` (`fail`) and returns 2."""
    def decorate(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
        @functools.wraps(main)
        def run(argv: list[str] | None = None) -> int:
            setup_logging()
            try:
                return main(argv)
            except (*INPUT_ERRORS, *errors) as e:
                return fail(f"{prefix}: {e}")
        return run
    return decorate
