"""`python -m imagefactory`: the same command line as `imagefactory` (the build worker
runs its bakes this way, with the interpreter it runs on)."""

from imagefactory.cli.main import main

if __name__ == "__main__":
    main(prog_name="imagefactory")
