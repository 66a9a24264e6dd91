"""``python -m fusedae``: the same as the ``fusedae`` command."""

from fusedae.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
