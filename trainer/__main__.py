"""`python -m trainer SPEC ...`: an alias of the process entry `python -m flashjob` (kept for existing launch
commands, e.g. api/proc.py). This script is never imported, so it adds no import edge from trainer/ upwards."""

from flashjob.cli import main

main()
