"""Operating a run: MLflow tracking, heartbeats, watchdog, stragglers, radio-monitor.

One module per concern (import them directly; this package imports nothing heavy):
  rundir      the run directory layout, atomic JSON writes, events.jsonl
  heartbeat   Heartbeat(run_dir, rank).beat(...), read_heartbeats(run_dir)
  watchdog    Watchdog(run_dir, rank, timeouts): stack dump + HANG marker + exit(3) on no progress
  stragglers  find_stragglers(heartbeats, ratio)
  nan_guard   NanGuard(rollback_after).check(loss) -> "ok" | "skip" | "rollback"
  tracking    Tracker: one MLflow run across requeues; system metrics sampler
  status, cli radio-monitor status | ui
  progress    StepProgress: a tqdm bar for interactive rank-0 runs
"""
