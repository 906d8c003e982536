"""``python -m cli``: the same as the ``circuit-catalog`` command."""

from cli import main

main()
