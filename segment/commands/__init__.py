"""The commands of the ``segment`` CLI, one module per group; :mod:`segment.cli` assembles them."""
