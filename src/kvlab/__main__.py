"""``python -m kvlab``: the CLI, for environments where the ``kvlab`` script is not on the PATH."""

from kvlab.cli import main

main()
