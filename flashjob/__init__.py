"""The process entry above `trainer/` and `inference/`: dispatches a job spec by kind (see flashjob/cli.py)."""
