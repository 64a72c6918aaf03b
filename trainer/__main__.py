"""`python -m trainer SPEC ...` and `accelerate launch -m trainer SPEC ...`."""

from trainer.cli import main

main()
