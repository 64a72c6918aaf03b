"""Programs that need both `trainer/` and `inference/`, so that neither of those imports the other.

One purpose: run the method end to end from above the library. That is the job process (`python -m flashjob`,
`flashdmd train|eval`: cli.py dispatches a spec by kind, eval through inference/), and the digits demo's programs
that train, sample checkpoints through inference/ and score them with the trainer's toy evaluator: demo.py (an
HTTP client of the service, `flashdmd demo`), digits_scoring.py, latency.py and rollout_reward.py (`flashdmd toy
train-rollout-reward`). The service (api/) sits above this package and launches it.
"""
