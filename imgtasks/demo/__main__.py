"""``python -m imgtasks.demo``: serve the demo corpus until Ctrl-C (see ``--help``)."""

from imgtasks.demo.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
