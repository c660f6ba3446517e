"""Code shared by device and edge: wire messages, verification math, vocabulary hash,
artifact manifest, and giving freed heap memory back (`heap`). Depends on numpy and the
standard library only."""
