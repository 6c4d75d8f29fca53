"""Exit statuses of `dsa-train` (README: "When things go wrong").

A scheduler can act on them without reading the log: requeue on PREEMPTED, alert on RUN_FAILED,
fix the command on USER_ERROR.
"""

OK = 0
# A bad config, recipe, input file or checkpoint, or a run directory in use by another job:
# nothing was started (and nothing the command created is left behind).
USER_ERROR = 2
# The run started and had to stop: non-finite losses, a checkpoint that could not be written (full
# disk, read-only storage). The last good checkpoint is named in the message; resume from it.
RUN_FAILED = 3
# Stopped by SIGTERM / a preemption notice after saving the current step: run the same command
# again to resume. 75 is EX_TEMPFAIL ("try again later") of sysexits.h.
PREEMPTED = 75
# A second Ctrl-C: stopped without waiting for the save (the previous checkpoint is intact).
INTERRUPTED = 130
