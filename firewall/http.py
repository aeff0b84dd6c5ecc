"""The Open Inference Protocol's HTTP/JSON binding (KServe v2 REST), with Triton's binary tensor extension.

A thin adapter over ``InferenceService``: each route turns JSON into the protocol's messages, calls
the same request path as the gRPC binding (identity header, throttling, pipeline, policy, alerts,
metrics), and turns the answer back into JSON. It runs on aiohttp in the gRPC server's process and
event loop.

    GET  /v2                                 server metadata
    GET  /v2/health/live, /v2/health/ready   200 when true, 400 when false (the protocol's 4xx)
    GET  /v2/models/{name}[/versions/{v}]    model metadata           .../ready   model readiness
    GET  .../config   .../stats   /v2/models/stats   POST /v2/repository/index
    POST /v2/models/{name}[/versions/{v}]/infer

Errors are ``{"error": message}`` with the gRPC binding's generic messages: 400 invalid input, 404
unknown model or path, 403 refused, 429 throttled, 503 model unavailable, 413 a body over
``max_message_bytes``. Binary extension: the ``Inference-Header-Content-Length`` header gives the
JSON header's length, each binary input says its ``binary_data_size``, and outputs asked for with
``binary_data`` (or all of them, with the request parameter ``binary_data_output``) come back the
same way. The ``Server`` header is not sent.

Bodies are bounded before the request path's own admission sees them: at most
``max_concurrent_requests`` inference bodies are read at once (beyond: 429 at once, counted as
throttled), and JSON is parsed on two threads of its own, so a large JSON body never stalls the
event loop that both bindings share.

Deadlines as on gRPC: the request's ``timeout`` parameter (microseconds, Triton's request timeout)
or else ``request_timeout_s`` bounds how long it may wait for a worker, and a client that closes
its connection cancels its request (the server runs with aiohttp's handler cancellation), so work
no worker has taken yet is dropped and counted (outcome ``abandoned``).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
from aiohttp import web

from firewall.config import ListenerTLS
from firewall.errors import InvalidInput, Rejection, Throttled, TooLarge
from firewall.protocol import pb
from firewall.service import InferenceService

HEADER_LENGTH = "Inference-Header-Content-Length"
STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
}
_NUMERIC = {"UINT8": np.dtype(np.uint8), "FP32": np.dtype("<f4")}  # the pixel datatypes the codec reads
_OUTPUT_DTYPES = {"INT64": np.dtype("<i8"), "FP32": np.dtype("<f4")}  # what the codec answers

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def application(service: InferenceService, max_body_bytes: int, max_bodies: int) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes, middlewares=[_errors])
    app.on_response_prepare.append(_hide_server)
    routes = Routes(service, max_bodies)
    app.on_cleanup.append(routes.close)
    app.router.add_get("/v2/models/stats", routes.model_statistics)  # before /v2/models/{name} matches it
    for model in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        app.router.add_get(model, routes.model_metadata)
        app.router.add_get(model + "/ready", routes.model_ready)
        app.router.add_get(model + "/config", routes.model_config)
        app.router.add_get(model + "/stats", routes.model_statistics)
        app.router.add_post(model + "/infer", routes.infer)
    app.router.add_get("/v2", routes.server_metadata)
    app.router.add_get("/v2/health/live", routes.live)
    app.router.add_get("/v2/health/ready", routes.ready)
    app.router.add_post("/v2/repository/index", routes.repository_index)
    return app


def ssl_context(config: ListenerTLS) -> ssl.SSLContext:
    """The gRPC listener's TLS for the HTTP listener too; with ``client_ca``, client certificates are required."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.cert, config.key)
    if config.client_ca is not None:
        context.load_verify_locations(config.client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class Routes:
    def __init__(self, service: InferenceService, max_bodies: int):
        self.service = service
        self.max_bodies = max_bodies
        self.bodies = 0  # inference bodies being read or parsed now
        self.parser = ThreadPoolExecutor(max_workers=2, thread_name_prefix="http-parse")

    async def close(self, app: web.Application) -> None:
        self.parser.shutdown(wait=False, cancel_futures=True)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(message_json(self.service.server_metadata()))

    async def live(self, request: web.Request) -> web.Response:
        return _health({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        return _health({"ready": await self.service.all_ready()})

    async def model_ready(self, request: web.Request) -> web.Response:
        return _health({"ready": await self.service.model_ready(request.match_info["name"])})

    async def model_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(message_json(self.service.model_metadata(request.match_info["name"])))

    async def model_config(self, request: web.Request) -> web.Response:
        return web.json_response(message_json(self.service.model_config(request.match_info["name"]).config))

    async def model_statistics(self, request: web.Request) -> web.Response:
        return web.json_response(message_json(self.service.model_statistics(request.match_info.get("name", ""))))

    async def repository_index(self, request: web.Request) -> web.Response:
        body = await request.read()
        options = await asyncio.get_running_loop().run_in_executor(self.parser, _json_object, body) if body else {}
        index = await self.service.repository_index(bool(options.get("ready", False)))
        return web.json_response([message_json(model) for model in index.models])

    async def infer(self, request: web.Request) -> web.Response:
        if self.bodies >= self.max_bodies:
            self.service.metrics.decisions.labels("", "throttled").inc()
            raise Throttled("too many HTTP bodies in flight")
        self.bodies += 1
        try:
            body = await request.read()
            parse = (_parse, request.match_info["name"], body, request.headers.get(HEADER_LENGTH))
            header, message = await asyncio.get_running_loop().run_in_executor(self.parser, *parse)
        finally:
            self.bodies -= 1
        claimed = request.headers.get(self.service.settings.client_id_header)
        forwarded = request.headers.getall(self.service.forwarded.header, [])
        identity = self.service.identify(request.remote or "", claimed, certificate_identity(request), forwarded)
        response = await self.service.infer(message, identity)
        return infer_response(response, header)


def certificate_identity(request: web.Request) -> str | None:
    """The verified client certificate's identity, as the gRPC binding reads it: first SAN, else CN."""
    certificate = request.transport.get_extra_info("peercert") if request.transport else None
    if not certificate:
        return None
    names = [value for _, value in certificate.get("subjectAltName", ())]
    common = [value for rdn in certificate.get("subject", ()) for key, value in rdn if key == "commonName"]
    return (names or common or [None])[0]


# -- JSON and binary tensors <-> the protocol's messages --------------------------------------


def _parse(model: str, body: bytes, header_length: str | None) -> tuple[dict[str, Any], pb.ModelInferRequest]:
    header, binary = _split_body(body, header_length)
    return header, infer_request(model, header, binary)


def infer_request(model: str, header: dict[str, Any], binary: bytes) -> pb.ModelInferRequest:
    """The JSON request (and its binary part) as a ModelInferRequest; every tensor's data as raw bytes."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidInput("the request needs a list of inputs")
    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput("id must be a string")
    message = pb.ModelInferRequest(model_name=model, id=request_id)
    offset = 0
    for tensor in inputs:
        if not isinstance(tensor, dict):
            raise InvalidInput("each input must be an object")
        name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str) or not _is_shape(shape):
            raise InvalidInput("each input needs a name, a datatype and a shape")
        message.inputs.add(name=name, datatype=datatype, shape=shape)
        size = _parameters(tensor).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidInput("binary_data_size does not match the binary data")
            raw, offset = binary[offset : offset + size], offset + size
        else:
            raw = _json_data(tensor.get("data"), datatype)
        if raw is not None:
            message.raw_input_contents.append(raw)
    if offset != len(binary):
        raise InvalidInput("binary data left over after the inputs")
    timeout = _parameters(header).get("timeout")  # Triton's request timeout, in microseconds
    if timeout is not None:
        if not isinstance(timeout, int) or isinstance(timeout, bool) or not 0 <= timeout < 2**63:
            raise InvalidInput("timeout must be a whole number of microseconds")
        message.parameters["timeout"].int64_param = timeout
    outputs = header.get("outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs):
        raise InvalidInput("outputs must be a list of objects with a name")
    for output in outputs:
        message.outputs.add(name=output["name"])
    return message


def infer_response(response: pb.ModelInferResponse, header: dict[str, Any]) -> web.Response:
    all_binary = _parameters(header).get("binary_data_output") is True
    wanted = {o["name"]: _parameters(o).get("binary_data") is True for o in header.get("outputs", [])}
    outputs, binary = [], []
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if wanted.get(tensor.name, all_binary):
            entry["parameters"] = {"binary_data_size": len(raw)}
            binary.append(raw)
        else:
            entry["data"] = np.frombuffer(raw, _OUTPUT_DTYPES[tensor.datatype]).tolist()
        outputs.append(entry)
    answer: dict[str, Any] = {"model_name": response.model_name, "outputs": outputs}
    if response.id:
        answer["id"] = response.id
    text = json.dumps(answer).encode()
    if not binary:
        return web.Response(body=text, content_type="application/json")
    headers = {HEADER_LENGTH: str(len(text))}
    return web.Response(body=text + b"".join(binary), content_type="application/octet-stream", headers=headers)


def message_json(message) -> dict[str, Any]:
    """A protocol message as Triton's JSON: field names as in the proto, numbers as numbers, enums by name."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.message_type is not None:
            out[field.name] = [message_json(v) for v in value] if field.is_repeated else message_json(value)
        elif field.enum_type is not None:
            name = field.enum_type.values_by_number
            out[field.name] = [name[v].name for v in value] if field.is_repeated else name[value].name
        else:
            out[field.name] = list(value) if field.is_repeated else value
    return out


def _split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        return _json_object(body), b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise InvalidInput(f"invalid {HEADER_LENGTH}")
    length = int(header_length)
    return _json_object(body[:length]), body[length:]


def _json_object(text: bytes) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidInput("the request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidInput("the request body must be a JSON object")
    return value


def _parameters(entry: dict[str, Any]) -> dict[str, Any]:
    parameters = entry.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidInput("parameters must be an object")
    return parameters


def _is_shape(shape: Any) -> bool:
    return isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)


def _json_data(data: Any, datatype: str) -> bytes | None:
    """JSON tensor data (flat or nested, row-major) as the raw bytes the gRPC binding would carry."""
    if data is None:
        raise InvalidInput("each input needs data or binary_data_size")
    if datatype == "BYTES":
        items = data if isinstance(data, list) else [data]
        if not all(isinstance(item, str) for item in items):
            raise InvalidInput("BYTES data must be strings")
        return b"".join(len(b).to_bytes(4, "little") + b for b in (item.encode() for item in items))
    if datatype not in _NUMERIC:
        return None  # no contents: the codec names the datatypes it accepts
    try:
        values = np.asarray(data)
    except ValueError:
        raise InvalidInput("tensor data must be a regular array of numbers") from None
    if values.dtype.kind not in "iuf" or (datatype == "UINT8" and values.dtype.kind == "f"):
        raise InvalidInput(f"tensor data does not match datatype {datatype}")
    if datatype == "UINT8" and values.size and (values.min() < 0 or values.max() > 255):
        raise InvalidInput("UINT8 contents out of range")
    return values.astype(_NUMERIC[datatype]).tobytes()


def _health(answer: dict[str, bool]) -> web.Response:
    return web.json_response(answer, status=200 if all(answer.values()) else 400)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure as ``{"error": message}``: the service's generic messages, or HTTP's own."""
    try:
        return await handler(request)
    except TooLarge as rejection:
        return web.json_response({"error": rejection.public_message}, status=413)
    except Rejection as rejection:
        return web.json_response({"error": rejection.public_message}, status=STATUS.get(rejection.code, 500))
    except web.HTTPRequestEntityTooLarge:
        return web.json_response({"error": TooLarge.public_message}, status=413)
    except web.HTTPException as error:  # unknown path, wrong method
        return web.json_response({"error": error.reason.lower()}, status=error.status)


async def _hide_server(request: web.Request, response: web.StreamResponse) -> None:
    response.headers.popall("Server", None)
