"""Code shared by device and edge: wire messages, verification math, vocabulary hash,
artifact manifest. Depends on numpy and the standard library only."""
