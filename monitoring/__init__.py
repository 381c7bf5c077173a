"""Operating a run: MLflow tracking, heartbeats, watchdog, stragglers, radio-monitor."""
