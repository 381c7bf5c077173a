"""MLflow tracking for a run that may be preempted and requeued many times: one MLflow run per training run.

Rank 0 holds an enabled `Tracker`; every other rank holds a disabled one (all calls are no-ops), so the
trainer calls it unconditionally. The MLflow run id travels in checkpoints: a requeued job passes it to
`start(run_id)` and keeps logging into THE SAME run. The store defaults to `sqlite:///<run_dir>/mlflow.db`;
any MLflow URI works, including a shared `mlflow server` (`http://host:5000`), which is what several
nodes should use when each logs its own system metrics (sqlite on a network filesystem locks badly).

Logging never blocks training: metrics, tags, artifacts and the final status go through a bounded queue to one
background sender thread, in order. While the store is unreachable (a tracking-server outage, where MLflow's
own HTTP retries take minutes) the sender keeps the oldest call and retries it with backoff, so nothing is lost
and later steps arrive after it, in order; `log_metrics` returns at once. `end()` (and interpreter exit) flush
with a bounded wait (`flush_timeout_s`); what is still queued then is reported as dropped.
"""
from __future__ import annotations

import atexit
import math
import queue
import re
import socket
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional

from .rundir import MLFLOW_ARTIFACTS_DIR, PathLike, mlflow_default_uri

# MLflow's own limits (mlflow.utils.validation), repeated so that importing this module stays cheap.
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
MAX_KEY = 250
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
TRUNCATED = "...[truncated]"
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
QUEUE_CALLS = 100_000  # logging calls held during an outage (about a day of steps at one call per step)
RETRY_MAX_S = 30.0  # longest wait between two tries of the same call while the store is unreachable


class TrackingError(RuntimeError):
    """A tracking store or run that cannot be used (one line: which run, which store)."""


def mlflow_key(key: str) -> str:
    """key made acceptable to MLflow (allowed characters, at most 250 long)."""
    return _BAD_KEY_CHARS.sub("_", str(key))[:MAX_KEY]


def _truncate(value: str, limit: int) -> str:
    return value if len(value) <= limit else value[: limit - len(TRUNCATED)] + TRUNCATED


def flatten_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Nested params -> {"a.b.c": str(value)} with MLflow-safe keys and values cut to 6000 characters."""
    from radio_scale.config.loader import flatten

    flat = flatten(dict(params)) if any(isinstance(v, Mapping) for v in params.values()) else dict(params)
    return {mlflow_key(k): _truncate(str(v), MAX_PARAM_VALUE) for k, v in flat.items()}


class Tracker:
    """One training run's MLflow run; a no-op when `enabled` is False (ranks other than 0)."""

    def __init__(self, uri: Optional[str], run_dir: PathLike, experiment: str, run_name: str, enabled: bool = True,
                 flush_timeout_s: float = 60.0, queue_calls: int = QUEUE_CALLS):
        self.enabled = enabled
        self.flush_timeout_s = flush_timeout_s
        self._sender = _Sender(self, queue_calls) if enabled else None
        self.run_dir = Path(run_dir)
        self.uri = uri or mlflow_default_uri(run_dir)
        self.experiment = experiment
        self.run_name = run_name
        self.run_id: Optional[str] = None
        self.failures = 0  # logging calls that failed and were dropped (store unreachable)
        self._client = None
        self._run_start_ms = 0
        self._last_step: dict[str, int] = {}
        self._lock = threading.Lock()
        self._sampler: Optional[SystemMetrics] = None

    # -- run life ---------------------------------------------------------------------------------------------
    def start(self, run_id: Optional[str] = None) -> Optional[str]:
        """Resume MLflow run `run_id` if given (a requeued job), else create one; returns the run id."""
        if not self.enabled:
            return run_id
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(tracking_uri=self.uri)
        if run_id:
            try:
                run = self._client.get_run(run_id)
            except MlflowException as e:
                raise TrackingError(f"cannot resume MLflow run {run_id} in {self.uri}: {_first_line(e)}") from None
            if run.info.lifecycle_stage != "active":
                raise TrackingError(f"MLflow run {run_id} in {self.uri} is deleted; restore it or start a new run")
            if run.info.status != "RUNNING":
                self._client.update_run(run_id, status="RUNNING")
            # Steps already logged before the requeue: replays of them are dropped, so histories stay monotonic.
            self._last_step = {m.key: int(m.step) for m in run.data.to_proto().metrics}
        else:
            exp_id = self._experiment_id()
            run = self._client.create_run(exp_id, run_name=self.run_name,
                                          tags={"host": socket.gethostname(), "run_dir": str(self.run_dir.resolve())})
            self._last_step = {}
        self.run_id = run.info.run_id
        self._run_start_ms = int(run.info.start_time or time.time() * 1000)
        return self.run_id

    def _experiment_id(self) -> str:
        from mlflow.exceptions import MlflowException

        exp = self._client.get_experiment_by_name(self.experiment)
        if exp is None:
            # A local store keeps artifacts in the run directory, not in the job's working directory.
            local = not self.uri.startswith(("http://", "https://", "databricks"))
            location = str((self.run_dir / MLFLOW_ARTIFACTS_DIR).resolve()) if local else None
            try:
                return self._client.create_experiment(self.experiment, artifact_location=location)
            except MlflowException:  # created meanwhile by another job sharing the store
                exp = self._client.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise
        if exp.lifecycle_stage != "active":
            raise TrackingError(f"MLflow experiment '{self.experiment}' in {self.uri} is deleted; "
                                f"restore it (mlflow experiments restore) or choose another tracking.experiment")
        return exp.experiment_id

    def end(self, status: str = "FINISHED", timeout_s: Optional[float] = None) -> bool:
        """Stop the system sampler, close the run as FINISHED, FAILED or KILLED (preempted: it will resume) and
        flush, waiting at most `timeout_s` (default `flush_timeout_s`); returns whether everything was sent."""
        if status not in RUN_STATUSES:
            raise ValueError(f"MLflow run status '{status}': expected one of {', '.join(RUN_STATUSES)}")
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None
        if self.enabled and self.run_id is not None:
            run_id = self.run_id
            self._submit(lambda: self._client.set_terminated(run_id, status))
            return self.flush(timeout_s)
        return True

    def flush(self, timeout_s: Optional[float] = None) -> bool:
        """Wait (at most `timeout_s`, default `flush_timeout_s`) until every queued logging call reached the store."""
        if self._sender is None:
            return True
        return self._sender.flush(self.flush_timeout_s if timeout_s is None else timeout_s)

    @property
    def pending(self) -> int:
        """Logging calls queued and not yet in the store."""
        return 0 if self._sender is None else self._sender.pending

    def _submit(self, call) -> None:
        """Queue one store call (in order); never blocks: a full queue drops the call and counts it."""
        if self._sender is None:
            return
        if not self._sender.put(call):
            self.failures += 1
            if self.failures <= 3 or self.failures % 100 == 0:
                print(f"[tracking] queue full ({self._sender.capacity} calls held while the store is unreachable): "
                      f"dropped a logging call ({self.failures} so far)", file=sys.stderr, flush=True)

    def _require_started(self) -> None:
        if self.run_id is None:
            raise TrackingError("Tracker used before start(): call start(run_id) first")

    # -- logging ----------------------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> list[str]:
        """Log params (nested dicts are flattened); returns keys whose earlier value differs and was kept.

        On a resumed run, params already logged with the same value are skipped. MLflow forbids changing a
        param, so a changed one (e.g. an override added at requeue) keeps its first value, gets a warning
        and a `changed_param/<key>` tag holding the new value.
        """
        if not self.enabled:
            return []
        self._require_started()
        from mlflow.entities import Param, RunTag

        flat = flatten_params(params)
        existing = self._client.get_run(self.run_id).data.params
        changed = sorted(k for k, v in flat.items() if k in existing and existing[k] != v)
        new = [Param(k, v) for k, v in flat.items() if k not in existing]
        for i in range(0, len(new), PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=new[i: i + PARAMS_PER_BATCH])
        if changed:
            warnings.warn(f"MLflow run {self.run_id}: params changed since first logged, kept old values: "
                          f"{', '.join(changed)}", stacklevel=2)
            tags = [RunTag(mlflow_key(f"changed_param/{k}"), _truncate(flat[k], MAX_TAG_VALUE)) for k in changed]
            for i in range(0, len(tags), PARAMS_PER_BATCH):
                self._client.log_batch(self.run_id, tags=tags[i: i + PARAMS_PER_BATCH])
        return changed

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (mutable, unlike params)."""
        if not self.enabled:
            return
        self._require_started()
        from mlflow.entities import RunTag

        items = [RunTag(mlflow_key(k), _truncate(str(v), MAX_TAG_VALUE)) for k, v in tags.items()]
        run_id = self.run_id
        for i in range(0, len(items), PARAMS_PER_BATCH):
            part = items[i: i + PARAMS_PER_BATCH]
            self._submit(lambda part=part: self._client.log_batch(run_id, tags=part))

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> int:
        """Log metrics at `step` in batches; returns how many were logged.

        A key's points at steps it has already reached (replayed after a requeue or a NaN rollback) are
        dropped, so every metric's history is monotonic in step. Values may be numbers or 0-dim tensors;
        None values (a metric not measured this step) are left out.
        """
        if not self.enabled:
            return 0
        self._require_started()
        from mlflow.entities import Metric

        values = {}
        for k, v in metrics.items():
            if v is None:
                continue
            try:
                values[mlflow_key(k)] = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"metric '{k}' = {v!r} at step {step} is not a number") from None
        now = int(time.time() * 1000)
        batch = []
        with self._lock:
            for key, value in values.items():
                if step > self._last_step.get(key, -1):
                    self._last_step[key] = int(step)
                    batch.append(Metric(key, value, now, int(step)))
        run_id = self.run_id
        for i in range(0, len(batch), METRICS_PER_BATCH):  # queued: an unreachable store never stalls the step
            part = batch[i: i + METRICS_PER_BATCH]
            self._submit(lambda part=part: self._client.log_batch(run_id, metrics=part))
        return len(batch)

    def log_artifact(self, path: PathLike, artifact_path: Optional[str] = None) -> None:
        """Upload a file (or a directory) to the run's artifacts."""
        if not self.enabled:
            return
        self._require_started()
        run_id = self.run_id
        self._submit(lambda: self._client.log_artifact(run_id, str(path), artifact_path))

    # -- system metrics ---------------------------------------------------------------------------------------
    def system_metrics(self, node: Optional[str] = None, every_s: float = 30.0) -> Optional["SystemMetrics"]:
        """Start a sampler thread logging this node's cpu/memory/GPU memory as `system/<node>/...` every every_s.

        Call it on one process per node (local rank 0) with a Tracker enabled and started on the same run id;
        stopped by end(). Steps are seconds since the MLflow run started, so they keep rising across requeues.
        """
        if not self.enabled:
            return None
        self._require_started()
        if self._sampler is None:
            self._sampler = SystemMetrics(self, node or socket.gethostname(), every_s)
            self._sampler.start()
        return self._sampler

    def seconds_since_run_start(self) -> int:
        """Whole seconds since the MLflow run was created (system-metric step)."""
        return max(0, int(time.time() - self._run_start_ms / 1000))


class SystemMetrics:
    """Daemon thread sampling node resources into a Tracker (cpu %, memory, this process's GPU memory)."""

    def __init__(self, tracker: Tracker, node: str, every_s: float):
        if every_s <= 0:
            raise ValueError(f"system metrics every_s={every_s}: must be > 0")
        self.tracker = tracker
        self.prefix = f"system/{mlflow_key(node).replace('/', '_')}/"
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="system-metrics", daemon=True)

    def start(self) -> None:
        import psutil

        psutil.cpu_percent(interval=None)  # the first call only sets the reference point
        self._thread.start()

    def sample(self) -> dict[str, float]:
        """One sample of this node's resources, keyed by metric name."""
        import psutil

        mem = psutil.virtual_memory()
        out = {"cpu_percent": psutil.cpu_percent(interval=None), "memory_percent": mem.percent,
               "memory_used_gb": (mem.total - mem.available) / 2**30}
        torch = sys.modules.get("torch")  # never import torch (or create a CUDA context) just to sample
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            dev = torch.cuda.current_device()
            free, total = torch.cuda.mem_get_info(dev)
            out[f"gpu{dev}_memory_used_gb"] = (total - free) / 2**30
            out[f"gpu{dev}_memory_allocated_gb"] = torch.cuda.memory_allocated(dev) / 2**30
            out[f"gpu{dev}_memory_reserved_gb"] = torch.cuda.memory_reserved(dev) / 2**30
        return {k: v for k, v in out.items() if math.isfinite(v)}

    def _run(self) -> None:
        while True:
            if self._stop.wait(self.every_s):
                return
            sample = {self.prefix + k: v for k, v in self.sample().items()}
            self.tracker.log_metrics(sample, self.tracker.seconds_since_run_start())

    def stop(self) -> None:
        """Stop sampling (waits for the thread)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)


class _Sender:
    """The one thread that talks to the store: calls run in the order they were queued; a call that fails because
    the store is unreachable is retried (backoff up to RETRY_MAX_S) before any later call, so an outage delays
    logging but loses and reorders nothing. A call the store refuses (HTTP 4xx: a bad value) is dropped."""

    def __init__(self, tracker: Tracker, capacity: int):
        self.tracker = tracker
        self.capacity = capacity
        self._queue: "queue.Queue" = queue.Queue(maxsize=capacity)
        self._wake = threading.Event()  # cut a retry wait short (flush)
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self.outage_errors = 0

    @property
    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def put(self, call) -> bool:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mlflow-sender", daemon=True)
                self._thread.start()
                atexit.register(self._at_exit)
        try:
            self._queue.put_nowait(call)
        except queue.Full:
            return False
        return True

    def flush(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + max(0.0, timeout_s)
        self._wake.set()
        q = self._queue
        with q.all_tasks_done:
            while q.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                q.all_tasks_done.wait(min(left, 0.5))
                self._wake.set()
        left = self._queue.unfinished_tasks
        if left:
            print(f"[tracking] {left} logging call(s) not sent after {timeout_s:g} s (store unreachable)",
                  file=sys.stderr, flush=True)
        return left == 0

    def _at_exit(self) -> None:
        if self._queue.unfinished_tasks:
            self.flush(self.tracker.flush_timeout_s)

    def _run(self) -> None:
        while True:
            call = self._queue.get()
            delay = 0.5
            while True:
                try:
                    call()
                    break
                except Exception as e:  # MlflowException, connection errors, sqlite "database is locked"
                    if _refused(e):
                        self.tracker.failures += 1
                        print(f"[tracking] the store refused a logging call (dropped): {_first_line(e)}",
                              file=sys.stderr, flush=True)
                        break
                    self.outage_errors += 1
                    if self.outage_errors <= 3 or self.outage_errors % 100 == 0:
                        print(f"[tracking] store unreachable, {self.pending} call(s) held, retrying: {_first_line(e)}",
                              file=sys.stderr, flush=True)
                    self._wake.wait(delay)
                    self._wake.clear()
                    delay = min(2 * delay, RETRY_MAX_S)
            self._queue.task_done()


def _refused(e: BaseException) -> bool:
    """An error the store will repeat for the same call (HTTP 4xx other than 408/429): retrying cannot help."""
    code = getattr(e, "get_http_status_code", None)
    try:
        status = int(code()) if callable(code) else None
    except Exception:
        status = None
    return status is not None and 400 <= status < 500 and status not in (408, 429)


def read_metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) points of metric `key` of an MLflow run, in the order they were logged."""
    from mlflow.tracking import MlflowClient

    hist = MlflowClient(tracking_uri=uri).get_metric_history(run_id, mlflow_key(key))
    return [(m.step, m.value) for m in sorted(hist, key=lambda m: (m.timestamp, m.step))]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
