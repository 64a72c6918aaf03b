"""The fault tier: the real Postgres and Redis (as the service tier), broken on purpose.

Nothing here touches the shared servers' state beyond a fresh database and tagged Redis keys: a test that
restarts a broker starts its own throwaway redis-server on a free port (faultkit.RedisServer), and an
unresponsive database is a local listener that accepts and never answers (faultkit.SilentServer).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))  # servicekit, appkit

import servicekit  # noqa: E402

# The service tier's session fixtures: a fresh database, tagged Redis keys, the roots.
database_url = servicekit.database_url
redis_client = servicekit.redis_client
roots = servicekit.roots
no_jobs_left_waiting = servicekit.no_jobs_left_waiting  # autouse
