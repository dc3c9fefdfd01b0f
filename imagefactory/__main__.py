"""`python -m imagefactory`: the same command line as `imagefactory`. The build worker runs
its bakes this way, with the interpreter it runs on; SIGTERM (what a bake gets when its
builder dies) then stops the command as Ctrl-C does, through its cleanup."""

import signal
from types import FrameType

from imagefactory.cli.main import main


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupt)
    main(prog_name="imagefactory")
