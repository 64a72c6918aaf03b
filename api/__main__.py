"""`python -m api ...` is `flashdmd ...` (used to start the embedded worker with this very interpreter)."""

from api.cli import main

main()
