"""Small helpers with no project dependencies: one-line user errors, atomic file writes, log filters."""
