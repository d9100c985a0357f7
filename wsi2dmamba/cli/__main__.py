"""``python -m wsi2dmamba.cli``: the command line."""

from . import main

main()
