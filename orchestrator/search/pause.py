"""Named places where a fault test holds the driver or a trial still, to kill it exactly there.

`ORCHESTRATOR_PAUSE_AT=<place>` and `ORCHESTRATOR_PAUSE_FILE=<path>` in the environment (Ray's workers inherit
it): the process reaching that place writes its pid to the file and waits to be killed. Unset, a pause point
costs one dictionary lookup.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PLACES = ("before_first_trial", "trial_recorded", "collect")


def pause_point(place: str) -> None:
    """Hold here forever when the environment asks for `place` (see the module's docstring)."""
    if os.environ.get("ORCHESTRATOR_PAUSE_AT") != place:
        return
    Path(os.environ["ORCHESTRATOR_PAUSE_FILE"]).write_text(str(os.getpid()))
    while True:
        time.sleep(3600)
