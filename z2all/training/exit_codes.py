"""Exit codes of ``train_my_ddp.py``: what a supervisor may conclude from how a rank ended.

The table with their meaning and what a supervisor should do is in docs/training.md ("Errors and
exit codes"); ``tests/training/test_train_errors.py`` checks that it lists exactly these constants.
Plain constants and no imports on purpose: ``monitor_process.py`` imports none of the training code
(a watchdog must survive whatever breaks training), so it mirrors these values.
"""

OK = 0  # the run reached --max_iters
CRASH = 1  # an unexpected exception (Python's own status for an uncaught one): may be restarted
USER_ERROR = 2  # a flag, config, data file or checkpoint to fix, or a full disk: do not restart
NONFINITE = 3  # the loss / gradient norm / state became NaN or Inf: do not restart unchanged
PREEMPTED = 4  # SIGTERM/SIGINT or --exit_after_minutes: a checkpoint was saved at the step reached; resume
