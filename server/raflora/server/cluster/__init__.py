"""Where a round's per-module work runs when it is not this process (docs/design.md §5.2)."""
