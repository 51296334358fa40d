"""The shadow: a challenger the registry aliases `shadow` (promotion.shadow), scored on every
request after the champion has answered, off the request path.

The request path only offers the answered records to a bounded queue (`serve.shadow_queue_rows`
rows): when it is full the shadow skips them and counts them, so it never delays or fails an
answer. One worker thread predicts what is queued with the shadow and logs it under the same
request ids with role `shadow`; monitoring pairs those rows with the champion's once labels
join and promotes or retires the shadow (pipelines/monitoring/shadow.py). A shadow that fails
to load or to predict is reported in /model and the log, and alerted once per problem; the
champion keeps serving either way.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Sequence
from typing import Any

from pipelines.core.config import Params
from pipelines.core.names import SHADOW
from pipelines.monitoring.prediction_log import PredictionLog
from serving.runtime import RegistrySource, Rows, ServedModel, hold_thread_budget, predict_records

log = logging.getLogger("loopline.serving")
SHADOW_ROLE = SHADOW


class ShadowScorer:
    def __init__(self, params: Params, source: RegistrySource, prediction_log: PredictionLog):
        self.params = params
        self._source = source
        self._log = prediction_log
        self.capacity = params.serve.shadow_queue_rows
        self.current: ServedModel | None = None
        self.wanted: tuple[str, str] | None = None  # the version and run the registry names
        self.problem: str | None = None
        self.scored = self.skipped = self.failed = 0
        self._queued = 0  # rows waiting
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._worker = threading.Thread(target=self._work, name="shadow-scorer", daemon=True)
        self._worker.start()

    def refresh(self) -> None:
        """Follow the registry's `shadow` alias: load a new one, drop a retired one. A
        failure keeps the champion serving and is reported (once per problem)."""
        try:
            version, run_id = self._source.aliased(SHADOW)
        except Exception as err:
            return self._report(f"checking for a shadow failed: {err}")
        if version is None or run_id is None:
            if self.current is not None:
                log.info("shadow v%s retired from the registry: no shadow now", self.current.version)
            self.current, self.wanted, self.problem = None, None, None
            return None
        if self.wanted == (version, run_id):
            return None  # loaded, or failed to load: not retried every poll
        self.wanted = (version, run_id)
        try:
            loaded = self._source.load(SHADOW, version, run_id)
        except Exception as err:
            self.current = None
            return self._report(getattr(err, "message", str(err)))
        self.current, self.problem = loaded, None
        log.info(
            "shadow v%s (run %s) loaded; engine %s: scoring every request after the answer",
            version,
            run_id,
            loaded.engine_name,
        )
        return None

    def offer(self, records: Rows, request_ids: Sequence[str]) -> None:
        """Queue answered rows (records or columns) for the shadow, or skip them when the queue is full."""
        served = self.current
        if served is None:
            return
        with self._lock:
            if self._queued + len(request_ids) > self.capacity:
                self.skipped += len(request_ids)
                return
            self._queued += len(request_ids)
        self._queue.put((served, records, request_ids))

    def _work(self) -> None:
        while True:
            served, records, request_ids = self._queue.get()
            try:
                hold_thread_budget(self.params.serve.model_threads)
                predictions, probabilities = predict_records(served, records, self.params)
                self._log.append(served, request_ids, records, predictions, probabilities, role=SHADOW_ROLE)
                self.scored += len(request_ids)
            except Exception as err:
                self.failed += len(request_ids)
                self._report(f"shadow v{served.version} failed to predict: {type(err).__name__}: {err}")
            finally:
                with self._lock:
                    self._queued -= len(request_ids)

    def _report(self, problem: str) -> None:
        if problem == self.problem:
            return
        self.problem = problem
        log.warning("%s (the champion keeps serving)", problem)
        from pipelines.core.alerts import Alert, send_in_background

        alert = Alert(
            event="shadow failed",
            title=f"the {self.params.tracking.model_name} shadow is not scoring",
            what=f"the service (pid {os.getpid()}) keeps answering with the champion; the shadow scores nothing",
            why=problem,
            where=f"the service's log and its /model; tracking store {self.params.tracking.uri}",
            level="warning",
        )
        send_in_background(self.params.alerts, alert)

    def status(self) -> dict[str, Any]:
        served = self.current
        return {
            "version": served.version if served else (self.wanted[0] if self.wanted else None),
            "run_id": served.run_id if served else (self.wanted[1] if self.wanted else None),
            "loaded": served is not None,
            "rows_scored": self.scored,
            "rows_skipped": self.skipped,
            "rows_failed": self.failed,
            "queued_rows": self._queued,
            "queue_rows": self.capacity,
            "last_error": self.problem,
        }
