"""`python -m flashjob SPEC ...` and `accelerate launch -m flashjob SPEC ...`."""

from flashjob.cli import main

main()
