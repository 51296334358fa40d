"""The BentoML service: the registry's `champion` over HTTP.

    bentoml serve serving.service:Predictor      (or `loopline serve`)

Two ways to get the model:
- from the MLflow registry (`loopline serve`): the params file in $LOOPLINE_PARAMS
  (default params.yaml) names the store and model; the service polls the `champion` alias
  every `serve.reload_interval_s` and switches when it moves (POST /admin/reload checks now);
- from a Bento built by `loopline package`: the champion was copied into the Bento with its
  params, and the Bento argument `model` names it. No registry needed, no reloading.

Without a champion the service starts, /readyz answers 503, and /predict answers 503 with a
message saying how to make one; it picks the champion up as soon as one is registered.
"""

from __future__ import annotations

import contextvars
import functools
import gc
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import bentoml
from starlette.responses import JSONResponse

from pipelines.core.config import load_params, parse_params
from pipelines.monitoring.prediction_log import PredictionLog, log_location
from serving.keys import load_api_keys
from serving.runtime import (
    ChampionHolder,
    ChampionLoadFailed,
    MicroBatcher,
    RegistrySource,
    Rows,
    ServedModel,
    Unavailable,
    hold_thread_budget,
    limit_threads,
    predict_records,
)
from serving.schema import (
    BatchPrediction,
    Prediction,
    ServiceStatus,
    batch_model,
    check_columns,
    column_batch_model,
    record_model,
)

BENTO_PARAMS_FILE = "params.json"


def die_with_parent() -> None:
    """BentoML starts each worker in a session of its own, so a SIGKILL of the server's
    process group misses the workers, and an orphan keeps answering on the port. Ask Linux to
    send a worker SIGTERM (it then shuts down cleanly, flushing the prediction log) when its
    parent, the `bentoml serve` arbiter, dies."""
    if not sys.platform.startswith("linux") or "--worker-id" not in sys.argv:
        return  # not a BentoML worker (the arbiter, a test, a Bento build import this module too)
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    orphaned = os.getppid() == 1 and b"bentoml" not in Path("/proc/1/cmdline").read_bytes()
    if orphaned:  # the arbiter died before the request above took effect
        os.kill(os.getpid(), signal.SIGTERM)


die_with_parent()


class RequestTimeout:
    """Answers 504 when a request has not started its response within `timeout` seconds,
    as BentoML's `TimeoutMiddleware` does, but with a deadline that is cancelled when the
    request ends. BentoML's keeps a timer (and what it holds) alive for the whole timeout
    after every request: under sustained load that piled up hundreds of thousands of objects
    and made each full garbage collection stall requests for 200+ ms. BentoML's config
    cannot switch it off (traffic.timeout must be positive), so it is replaced here, in the
    worker, before BentoML builds the app."""

    def __init__(self, app: Any, timeout: float) -> None:
        self.app, self.timeout = app, timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        import asyncio

        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        started = False
        try:
            async with asyncio.timeout(self.timeout) as deadline:

                async def send_started(message: dict) -> None:
                    nonlocal started
                    if not started:
                        started = True
                        deadline.reschedule(None)  # the response has begun: no deadline for the rest
                    await send(message)

                await self.app(scope, receive, send_started)
        except TimeoutError:
            if started:
                raise
            body = json.dumps(
                {"error": f"the request was not answered within {self.timeout:g} s (serve.request_timeout_s)"}
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 504,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})


def _use_request_timeout() -> None:
    import bentoml._internal.server.http.traffic as traffic

    traffic.TimeoutMiddleware = RequestTimeout  # type: ignore[misc,assignment]  # looked up by BentoML when it builds the app


_use_request_timeout()


def _configuration():
    """(params, Bento model tag or None) from the Bento argument `model` or $LOOPLINE_PARAMS."""
    tag = getattr(bentoml.use_arguments(), "model", None)
    if tag:
        stored = bentoml.models.get(tag)
        raw = json.loads(Path(stored.path_of(BENTO_PARAMS_FILE)).read_text(encoding="utf-8"))
        return parse_params(raw, f"{tag}/{BENTO_PARAMS_FILE}"), tag
    return load_params(os.environ.get("LOOPLINE_PARAMS", "params.yaml")), None


PARAMS, BENTO_MODEL = _configuration()
Record = record_model(PARAMS)
RecordBatch = batch_model(PARAMS, Record)
ColumnBatch = column_batch_model(PARAMS, Record)
GC_GEN0_THRESHOLD = 20_000
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
BAD_REQUEST_ID = "header X-Request-ID must be 1-64 characters of A-Z a-z 0-9 . _ : -"

PREDICTIONS = bentoml.metrics.Counter(
    name="loopline_predictions", documentation="Rows predicted, by model version", labelnames=["model_version"]
)
BATCH_ROWS = bentoml.metrics.Histogram(
    name="loopline_batch_rows",
    documentation="Rows per model call",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)


def _error(status: int, message: str, ctx: bentoml.Context) -> Any:
    """A JSON error body. Typed Any: an API's return annotation is its success type (BentoML
    builds the output spec from it) and a Starlette response returned instead is sent as is."""
    ctx.response.status_code = status  # BentoML sets the status from the context when an API takes one
    return JSONResponse({"error": message}, status_code=status)


_HOLDER: list[ChampionHolder] = []  # the worker's holder, for the readiness probe
REQUEST: contextvars.ContextVar[str] = contextvars.ContextVar("loopline_request", default="-")
CALLER: contextvars.ContextVar[str | None] = contextvars.ContextVar("loopline_caller", default=None)  # the key's id
KEYED_ROUTES = ("/predict", "/predict_batch", "/predict_columns")
API_KEYS = load_api_keys(PARAMS)
log = logging.getLogger("loopline.serving")
logging.getLogger("loopline").setLevel(logging.INFO)  # model switches belong in the service log


def rejected(path: str, status: int, why: str) -> None:
    """One WARNING line per refused request: the client's mistake, not the server's."""
    log.warning("rejected %s (%d, request id %s): %s", path, status, REQUEST.get(), why)


class ClientErrorsAsWarnings(logging.Filter):
    """BentoML logs a request that fails validation as ERROR "Exception on /predict" with the
    pydantic traceback; a bad request is the client's mistake, worth one WARNING line naming
    the request id, the fields and their rules."""

    def filter(self, record: logging.LogRecord) -> bool:
        from pydantic import ValidationError

        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, ValidationError):
            return True
        fields = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['type']} ({e['msg']})"
            for e in error.errors(include_url=False)[:5]
        )
        rejected(str(record.args[0]) if isinstance(record.args, tuple) and record.args else "?", 400, fields)
        return False


logging.getLogger("bentoml._internal.server.http_app").addFilter(ClientErrorsAsWarnings())


def service_status(holder: ChampionHolder) -> ServiceStatus:
    """/model: the holder's status and who may predict (the keys' ids, never a key)."""
    authentication = "API keys: " + ", ".join(API_KEYS.ids) if API_KEYS is not None else "none"
    return ServiceStatus(**holder.status(), authentication=authentication)


def not_ready_reason() -> str | None:
    """Why /readyz is 503 (None when a model is in service)."""
    if not _HOLDER:
        return "starting"
    holder = _HOLDER[0]
    if holder.current is not None:
        return None
    try:
        holder.require()
    except Unavailable as err:
        return err.message
    return None


class RequestGuard:
    """ASGI middleware for every POST (the API routes): JSON bodies only (415), and no body
    larger than `serve.max_body_bytes` (413), checked before anything parses it. It also
    answers GET /readyz with the reason when there is no model to serve (BentoML's own
    probe only says that `__is_ready__` returned False), and GET /model with the status."""

    def __init__(self, app: Any, max_body_bytes: int):
        self.app, self.max = app, max_body_bytes

    async def _reject(
        self, send: Any, status: int, message: str, path: str | None = None, headers: list | None = None
    ) -> None:
        if path is not None:
            rejected(path, status, message)
        await self._send_json(send, status, json.dumps({"error": message}).encode(), headers)

    async def _send_json(self, send: Any, status: int, body: bytes, headers: list | None = None) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *(headers or []),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            if scope["path"] == "/readyz" and (reason := not_ready_reason()) is not None:
                return await self._reject(send, 503, reason)
            if scope["path"] == "/docs.json":
                return await self._send_json(send, 200, openapi_document())
            if scope["path"] == "/model" and _HOLDER:  # a read: GET, as /readyz is (POST is kept too)
                status = service_status(_HOLDER[0]).model_dump_json().encode()
                return await self._send_json(send, 200, status)
            if scope["path"] == "/docs":  # where the README and --help say the UI is; BentoML serves it at /
                return await self._send_json(send, 307, b"{}", [(b"location", b"/")])
        if scope["type"] == "http" and scope["path"] == "/model" and scope["method"] not in ("GET", "POST"):
            body = json.dumps({"error": "/model answers GET (and POST)"}).encode()
            return await self._send_json(send, 405, body, [(b"allow", b"GET, POST")])
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        REQUEST.set(headers.get(b"x-request-id", b"-").decode("latin-1")[:64])
        path = scope["path"]
        if path.startswith("/admin/") and (refused := admin_refusal(headers.get(b"authorization"))) is not None:
            return await self._reject(send, 401, refused, path)
        if API_KEYS is not None and path in KEYED_ROUTES:
            caller = API_KEYS.caller(headers.get(b"authorization"), headers.get(b"x-api-key"))
            if caller is None:
                why = (
                    "the API key is not one of the service's"
                    if headers.get(b"authorization") or headers.get(b"x-api-key")
                    else "this service needs an API key: send Authorization: Bearer <key> (or X-API-Key: <key>)"
                )
                return await self._reject(send, 401, why, path, [(b"www-authenticate", b'Bearer realm="loopline"')])
            CALLER.set(caller)
        media = headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
        if media != b"application/json":
            return await self._reject(
                send, 415, f"send JSON (Content-Type: application/json), not {media.decode('latin-1')!r}", path
            )
        too_big = f"request body is larger than serve.max_body_bytes ({self.max} bytes)"
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max:
            return await self._reject(send, 413, too_big, path)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max:
                return await self._reject(send, 413, too_big, path)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


@functools.cache
def admin_token() -> str | None:
    """$LOOPLINE_ADMIN_TOKEN, else the contents of serve.admin_token_file; None: no token."""
    token = os.environ.get("LOOPLINE_ADMIN_TOKEN")
    if not token and PARAMS.serve.admin_token_file:
        token = Path(PARAMS.serve.admin_token_file).read_text(encoding="utf-8").strip()
    return token or None


def admin_refusal(authorization: bytes | None) -> str | None:
    """Why a POST /admin/* is refused (None: allowed). A configured token is always required;
    without one the admin routes are open on loopback only ($LOOPLINE_SERVE_HOST, set by
    `loopline serve`, else serve.host)."""
    import hmac

    token = admin_token()
    host = os.environ.get("LOOPLINE_SERVE_HOST") or PARAMS.serve.host
    if token is None:
        if host in LOOPBACK:
            return None
        return (
            f"the service listens on {host}, beyond loopback: admin routes need a token "
            "(set LOOPLINE_ADMIN_TOKEN or serve.admin_token_file, send Authorization: Bearer <token>)"
        )
    given = (authorization or b"").decode("latin-1")
    if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].strip().encode(), token.encode()):
        return "admin routes need the header Authorization: Bearer <token> with the service's admin token"
    return None


def _load_bento_model(path: Path):
    from pipelines.model.io import load_model
    from pipelines.model.onnx_engine import ONNX_FILE, PARITY_FILE

    def load(current: ServedModel | None) -> ServedModel | None:
        if current is not None:
            return None  # a Bento holds one model
        try:
            model, meta = load_model(path)
        except Exception as err:
            raise ChampionLoadFailed(f"the Bento's model {path} failed to load: {type(err).__name__}: {err}") from None
        files = {f: (path / f).read_bytes() for f in (ONNX_FILE, PARITY_FILE) if (path / f).is_file()}
        return ServedModel.of(model, meta, meta["model_name"], meta["model_version"], meta["run_id"], PARAMS, files)

    return load


@bentoml.service(
    name="loopline",
    http={"port": PARAMS.serve.port},
    traffic={"timeout": PARAMS.serve.request_timeout_s},
    logging={"access": {"enabled": False}},
    # serve.tracing off: every URL is excluded, so BentoML's OpenTelemetry middleware passes requests on untouched
    tracing={} if PARAMS.serve.tracing else {"excluded_urls": [".*"]},
)
class Predictor:
    if BENTO_MODEL:
        bento_model = bentoml.models.BentoModel(BENTO_MODEL)

    def __init__(self) -> None:

        limit_threads(PARAMS.serve.model_threads)
        if BENTO_MODEL:
            self.holder = ChampionHolder(PARAMS, _load_bento_model(Path(self.bento_model.path)), f"bento {BENTO_MODEL}")
        self.prediction_log = PredictionLog(os.environ.get("LOOPLINE_PREDICTION_LOG") or log_location(PARAMS))
        if not BENTO_MODEL:
            from serving.shadow import ShadowScorer

            source = RegistrySource(PARAMS)
            self.holder = ChampionHolder(PARAMS, source, "registry")
            self.holder.shadow = ShadowScorer(PARAMS, source, self.prediction_log)  # a Bento holds one model: no shadow
        _HOLDER[:] = [self.holder]
        self.holder.refresh()
        if not BENTO_MODEL:
            self.holder.start_polling(PARAMS.serve.reload_interval_s)
        self.batcher = MicroBatcher(
            self._predict_single, PARAMS.serve.max_batch_size, PARAMS.serve.batch_wait_ms / 1000
        )
        # Everything loaded so far (libraries, the model) lives as long as the process: keep it
        # out of the cyclic GC, whose full collections over it stalled requests for ~0.4 s.
        # A request allocates a few thousand short-lived container objects; a larger first
        # generation lets most die before a collection has to look at them.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_GEN0_THRESHOLD, 20, 20)

    def __is_ready__(self) -> bool:
        return self.holder.current is not None

    @bentoml.on_shutdown
    def close(self) -> None:
        self.holder.stop()
        self.prediction_log.flush()

    def _predict(self, records: Rows, request_ids: list[str], callers: list[str | None] | str | None):
        hold_thread_budget(PARAMS.serve.model_threads)
        served = self.holder.require()  # one model for the whole batch, even if a reload lands meanwhile
        predictions, probabilities = predict_records(served, records, PARAMS)
        self.prediction_log.append(served, request_ids, records, predictions, probabilities, callers=callers)
        if self.holder.shadow is not None:  # answered: the shadow scores these rows later, if there is room
            self.holder.shadow.offer(records, request_ids)
        PREDICTIONS.labels(model_version=served.version).inc(len(request_ids))
        BATCH_ROWS.observe(len(request_ids))
        return served, predictions, probabilities

    def _predict_single(self, items: list[tuple[dict[str, Any], str, str | None]]) -> list[Prediction]:
        request_ids = [rid for _, rid, _ in items]
        callers = [caller for _, _, caller in items]
        served, predictions, probabilities = self._predict([record for record, _, _ in items], request_ids, callers)
        return [
            Prediction(
                prediction=p,
                probabilities=probabilities[i] if probabilities else None,
                model_name=served.name,
                model_version=served.version,
                run_id=served.run_id,
                request_id=rid,
            )
            for i, (p, rid) in enumerate(zip(predictions, request_ids, strict=True))
        ]

    @staticmethod
    def _request_id(ctx: bentoml.Context) -> str | None:
        given = ctx.request.headers.get("x-request-id")
        if given is None:
            import uuid

            return uuid.uuid4().hex
        return given if REQUEST_ID.fullmatch(given) else None

    @bentoml.api(route="/predict", input_spec=Record)
    async def predict(self, ctx: bentoml.Context, **record: Any) -> Prediction:
        """Predict one record. Concurrent requests are predicted together in micro-batches.
        An `X-Request-ID` header (1-64 of A-Z a-z 0-9 . _ : -) names the prediction in the log."""
        request_id = self._request_id(ctx)
        if request_id is None:
            rejected("/predict", 400, BAD_REQUEST_ID)
            return _error(400, BAD_REQUEST_ID, ctx)
        try:
            return await self.batcher.submit((record, request_id, CALLER.get()))
        except Unavailable as err:
            return _error(503, err.message, ctx)

    async def _predict_rows(self, ctx: bentoml.Context, route: str, rows: Any, count: int) -> Any:
        """A batch's answer: ids "<X-Request-ID>-<i>", one model call off the event loop."""
        import asyncio

        request_id = self._request_id(ctx)
        if request_id is None:
            rejected(route, 400, BAD_REQUEST_ID)
            return _error(400, BAD_REQUEST_ID, ctx)
        request_ids = [f"{request_id}-{i}" for i in range(count)]
        try:
            served, predictions, probabilities = await asyncio.to_thread(self._predict, rows, request_ids, CALLER.get())
        except Unavailable as err:
            return _error(503, err.message, ctx)
        return BatchPrediction(
            predictions=predictions,
            probabilities=probabilities,
            model_name=served.name,
            model_version=served.version,
            run_id=served.run_id,
            request_ids=request_ids,
        )

    @bentoml.api(route="/predict_batch", input_spec=RecordBatch)
    async def predict_batch(self, ctx: bentoml.Context, records: list) -> BatchPrediction:
        """Predict a list of records in one call (at most `serve.max_batch_records`)."""
        return await self._predict_rows(ctx, "/predict_batch", [r.model_dump() for r in records], len(records))

    @bentoml.api(route="/predict_columns", input_spec=ColumnBatch)
    async def predict_columns(self, ctx: bentoml.Context, **columns: Any) -> BatchPrediction:
        """Predict a batch sent as columns: one array per feature (and per context field sent),
        all of one length, at most `serve.max_batch_records`. The same rules as /predict_batch,
        checked over whole columns; the answer is /predict_batch's."""
        try:
            typed = check_columns(columns, PARAMS)
        except ValueError as err:
            rejected("/predict_columns", 400, str(err))
            return _error(400, str(err), ctx)
        return await self._predict_rows(ctx, "/predict_columns", typed, len(typed[PARAMS.features.columns[0]]))

    @bentoml.api(route="/admin/reload")
    async def reload(self) -> ServiceStatus:
        """Ask the registry for the champion now (the service also polls it on its own)."""
        import asyncio

        await asyncio.to_thread(self.holder.refresh)
        return service_status(self.holder)

    @bentoml.api(route="/model")
    def model_info(self) -> ServiceStatus:
        """The model in service, where it came from, and the last registry check."""
        return service_status(self.holder)


@functools.cache
def openapi_document() -> bytes:
    from pydantic import BaseModel

    from serving.openapi import corrected_spec

    routes: dict[str, tuple[type[BaseModel] | None, type[BaseModel]]] = {
        "/predict": (Record, Prediction),
        "/predict_batch": (RecordBatch, BatchPrediction),
        "/predict_columns": (ColumnBatch, BatchPrediction),
        "/model": (None, ServiceStatus),
        "/admin/reload": (None, ServiceStatus),
    }
    spec = corrected_spec(
        Predictor.openapi_spec.asdict(),  # type: ignore[attr-defined]  # added by @bentoml.service
        routes,
        {"/predict", "/predict_batch", "/predict_columns"},
    )
    return json.dumps(spec).encode()


Predictor.add_asgi_middleware(RequestGuard, max_body_bytes=PARAMS.serve.max_body_bytes)  # type: ignore[attr-defined]
