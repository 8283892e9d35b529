"""A loopback stand-in for TF Serving, for development and tests only.

`tensorflow_model_server` is not installable from the registries CI reaches (PyPI, Debian, npm),
so this module serves a SavedModel in the TF Serving layout (`<base>/<version>/saved_model.pb`)
over the same gRPC API (`tensorflow.serving.PredictionService`: `Predict`, `GetModelMetadata`)
and a subset of the REST API (`/v1/models/<name>[/versions/<v>][:predict|/metadata]`). Requests
are checked against the signature as TF Serving checks them (model name and version, signature
name, input keys, dtypes and shapes) and run through the SavedModel's signatures, so a client that
works here speaks the TF Serving protocol. It is NOT a production server: no batching, no model
reloading, no monitoring, one model, one version.

Usage:
  python -m asl_tf.serving.testing_server --model_base_path=export/models/asl --model_name=asl \
      --port=8500 --rest_api_port=8501

The module also writes the stand-in SavedModel used by the serving tests and benchmarks
(`write_stand_in_model`): the three signatures of the real export, computed by simple
deterministic functions of the input.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # the command line: TensorFlow's start-up lines hidden before it loads
  from asl_tf import tool_process  # pylint: disable=g-import-not-at-top
  tool_process.prepare_tensorflow(tool_process.argv_verbosity(sys.argv))

import http.server
import json
import os
import re
import threading
from concurrent import futures
from typing import Dict, Mapping, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
from google.protobuf import json_format
import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.python.saved_model import loader_impl
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import model_pb2
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_log_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from asl_tf.serving import warmup

# TF Serving raises gRPC's message limits to INT32_MAX on its side; a [1, 18432, 2048] float32
# request is ~151 MB, far above gRPC's 4 MB default.
MAX_MESSAGE_BYTES = 2**31 - 1
GRPC_MESSAGE_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
)
DEFAULT_SIGNATURE = "serving_default"

# Frames a request may hold when the export does not say (exports before --max_frames).
DEFAULT_MAX_FRAMES = 1 << 20
_GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class RequestError(Exception):
  """A request the servable refuses; carries the gRPC status code TF Serving would return."""

  def __init__(self, code: grpc.StatusCode, message: str):
    super().__init__(message)
    self.code = code
    self.message = message


def dtype_name(dtype_enum: int) -> str:
  """`types_pb2.DT_FLOAT` -> `"DT_FLOAT"`."""
  return types_pb2.DataType.Name(dtype_enum)


def shape_string(tensor_shape) -> str:
  """A `TensorShapeProto` as `[-1,-1,2048]` (`?` for unknown rank)."""
  if tensor_shape.unknown_rank:
    return "?"
  return "[" + ",".join(str(d.size) for d in tensor_shape.dim) + "]"


def json_array(key: str, value, np_dtype, max_frames: int) -> np.ndarray:
  """A REST input (nested JSON lists) as an array of `np_dtype`, refused rather than cast.

  Integer inputs must hold JSON integers within the dtype's range (not 50.7, not true); float
  inputs must hold numbers (not booleans or strings); the second dimension is at most
  `max_frames`.

  Raises:
    RequestError: INVALID_ARGUMENT naming the input.
  """
  def fail(why):
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"input '{key}' {why}")

  if np_dtype is None:
    return np.asarray(value, dtype=object)  # an unknown key: check_inputs names it
  try:
    raw = np.asarray(value)
  except (ValueError, TypeError, OverflowError) as e:
    raise fail(f"is not a rectangular array: {e}") from None
  if raw.ndim >= 2 and raw.shape[1] > max_frames:
    raise fail(f"has {raw.shape[1]} frames; this model serves at most {max_frames}")
  integer = np.issubdtype(np_dtype, np.integer)
  allowed = "iu" if integer else "iuf"
  if raw.dtype.kind not in allowed:
    what = "integers" if integer else "numbers"
    kind = {"b": "booleans", "f": "fractions", "U": "strings", "O": "mixed or ragged values"}
    raise fail(f"holds {kind.get(raw.dtype.kind, raw.dtype.name)}; expected {what}")
  if integer and raw.size and (raw.min() < np.iinfo(np_dtype).min
                               or raw.max() > np.iinfo(np_dtype).max):
    raise fail(f"holds values outside {np.dtype(np_dtype).name}")
  return raw.astype(np_dtype)


def check_inputs(signature_name: str, signature_def, inputs: Mapping[str, tuple]) -> None:
  """Checks input keys, dtypes and shapes against a signature, as TF Serving does.

  Args:
    signature_name: used in messages.
    signature_def: `meta_graph_pb2.SignatureDef`.
    inputs: input key -> (dtype enum, shape tuple).

  Raises:
    RequestError: INVALID_ARGUMENT naming the input and the expected dtype / shape.
  """
  expected = signature_def.inputs
  missing = sorted(set(expected) - set(inputs))
  extra = sorted(set(inputs) - set(expected))
  if missing or extra:
    want = ", ".join(f"{k}: {dtype_name(v.dtype)} {shape_string(v.tensor_shape)}"
                     for k, v in sorted(expected.items()))
    problems = [f"missing input '{k}'" for k in missing] + [
        f"unexpected input '{k}'" for k in extra]
    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                       f"signature '{signature_name}': {', '.join(problems)}; expected inputs "
                       f"{{{want}}}")
  for key, (dtype, shape) in sorted(inputs.items()):
    info = expected[key]
    want = f"{dtype_name(info.dtype)} {shape_string(info.tensor_shape)}"
    if dtype != info.dtype:
      raise RequestError(
          grpc.StatusCode.INVALID_ARGUMENT,
          f"input '{key}' of signature '{signature_name}' has dtype {dtype_name(dtype)}; "
          f"expected {want}")
    if info.tensor_shape.unknown_rank:
      continue
    dims = [d.size for d in info.tensor_shape.dim]
    if len(shape) != len(dims) or any(d not in (-1, s) for d, s in zip(dims, shape)):
      got = "[" + ",".join(str(s) for s in shape) + "]"
      raise RequestError(
          grpc.StatusCode.INVALID_ARGUMENT,
          f"input '{key}' of signature '{signature_name}' has shape {got}; expected {want}")


def _served_max_frames(path: str) -> int:
  """The export's `max_frames` (assets/timebase.json), else DEFAULT_MAX_FRAMES."""
  try:
    with open(os.path.join(path, "assets", "timebase.json")) as f:
      return int(json.load(f).get("max_frames", DEFAULT_MAX_FRAMES))
  except (OSError, ValueError, TypeError):
    return DEFAULT_MAX_FRAMES


def check_tensor_size(key: str, proto, max_frames: int) -> None:
  """Refuses, before anything is allocated, a TensorProto with more frames (its second
  dimension) than the model serves, larger than the largest message the server accepts, or
  whose values are neither one (TF Serving repeats a single value over the declared shape, as
  warm-up requests do) nor one per element.

  Without the frame limit an 82-byte request (one value, a huge declared shape) could make the
  server build and run a tensor of any size.

  Raises:
    RequestError: INVALID_ARGUMENT naming the input.
  """
  dims = [d.size for d in proto.tensor_shape.dim]
  if len(dims) >= 2 and dims[1] > max_frames:
    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                       f"input '{key}' has {dims[1]} frames; this model serves at most "
                       f"{max_frames} (its export's --max_frames)")
  declared = int(np.prod(dims, dtype=np.float64)) if dims else 1
  itemsize = tf.dtypes.as_dtype(proto.dtype).size if proto.dtype else 0
  if declared * max(itemsize, 1) > MAX_MESSAGE_BYTES:
    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                       f"input '{key}' declares shape {dims}: more than the "
                       f"{MAX_MESSAGE_BYTES >> 20} MiB a request may carry")
  if proto.tensor_content:
    carried = len(proto.tensor_content) // max(itemsize, 1)
  else:
    carried = max(len(proto.float_val), len(proto.int_val), len(proto.int64_val),
                  len(proto.double_val), len(proto.bool_val), len(proto.half_val))
  if carried not in (1, declared):
    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                       f"input '{key}' declares shape {dims} ({declared} values) but carries "
                       f"{carried}")


def latest_version(model_base_path: str) -> int:
  """The highest integer sub-folder of a TF Serving base path that holds a SavedModel."""
  if not os.path.isdir(model_base_path):
    raise FileNotFoundError(f"--model_base_path={model_base_path} is not a folder; point it at "
                            "the model's base folder (the one holding <version>/)")
  versions = [int(d) for d in os.listdir(model_base_path)
              if d.isdigit() and tf.saved_model.contains_saved_model(
                  os.path.join(model_base_path, d))]
  if not versions:
    raise FileNotFoundError(f"no <version>/saved_model.pb under {model_base_path!r}; export "
                            "with asl_tf.export or point --model_base_path at the base folder")
  return max(versions)


class Servable:
  """One loaded SavedModel version: signature checks and execution.

  Args:
    model_base_path: TF Serving base path (integer version folders).
    model_name: name requests must use.
    model_version: version to load; 0 = the highest.
  """

  def __init__(self, model_base_path: str, model_name: str, model_version: int = 0):
    self.model_name = model_name
    self.version = model_version or latest_version(model_base_path)
    self.path = os.path.join(model_base_path, str(self.version))
    saved_model = loader_impl.parse_saved_model(self.path)
    meta_graph = next((m for m in saved_model.meta_graphs
                       if "serve" in m.meta_info_def.tags), saved_model.meta_graphs[0])
    self.signature_defs = get_model_metadata_pb2.SignatureDefMap()
    for name, sig in meta_graph.signature_def.items():
      if name != "__saved_model_init_op":
        self.signature_defs.signature_def[name].CopyFrom(sig)
    self._loaded = tf.saved_model.load(self.path)  # Keep a reference: signatures need it.
    self.max_frames = _served_max_frames(self.path)
    self.num_warmup_requests = self._replay_warmup()

  def check_model_spec(self, model_spec) -> str:
    """Checks name and version of a `ModelSpec`; returns the signature name to run."""
    version = model_spec.version.value if model_spec.HasField("version") else self.version
    if model_spec.version_label:
      raise RequestError(grpc.StatusCode.NOT_FOUND,
                         f"version labels are not served here ({model_spec.version_label!r})")
    if model_spec.name != self.model_name or version != self.version:
      request = (f"Specific({model_spec.name}, {version})" if model_spec.HasField("version")
                 else f"Latest({model_spec.name})")
      raise RequestError(grpc.StatusCode.NOT_FOUND,
                         f"Servable not found for request: {request}; this server serves "
                         f"model '{self.model_name}' version {self.version}")
    return model_spec.signature_name or DEFAULT_SIGNATURE

  def signature_def(self, signature_name: str):
    """The SignatureDef of a signature name; INVALID_ARGUMENT if it is not served."""
    if signature_name not in self.signature_defs.signature_def:
      raise RequestError(
          grpc.StatusCode.INVALID_ARGUMENT,
          f'Serving signature name: "{signature_name}" not found in signature def; available: '
          f"{sorted(self.signature_defs.signature_def)}")
    return self.signature_defs.signature_def[signature_name]

  def run(self, signature_name: str, inputs: Mapping[str, np.ndarray],
          output_filter: Sequence[str] = ()) -> Dict[str, np.ndarray]:
    """Runs a signature on checked inputs.

    Args:
      signature_name: signature key.
      inputs: input key -> array (dtype and shape already checked).
      output_filter: output keys to return (empty = all).

    Returns:
      Output key -> array.

    Raises:
      RequestError: unknown output keys, or the graph rejected the inputs.
    """
    sig = self.signature_def(signature_name)
    unknown = sorted(set(output_filter) - set(sig.outputs))
    if unknown:
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"output_filter {unknown} not in signature '{signature_name}' outputs "
                         f"{sorted(sig.outputs)}")
    fn = self._loaded.signatures[signature_name]
    try:
      outputs = fn(**{k: tf.convert_to_tensor(v) for k, v in inputs.items()})
    except tf.errors.OpError as e:
      raise RequestError(_GRPC_CODES.get(e.error_code, grpc.StatusCode.INTERNAL),
                         e.message) from e
    keys = output_filter or sorted(outputs)
    return {k: outputs[k].numpy() for k in keys}

  def predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
    """Serves one `PredictRequest` (model spec, signature and input checks, execution)."""
    signature_name = self.check_model_spec(request.model_spec)
    sig = self.signature_def(signature_name)
    check_inputs(signature_name, sig, {
        k: (v.dtype, tuple(d.size for d in v.tensor_shape.dim)) for k, v in request.inputs.items()})
    for key, proto in request.inputs.items():
      check_tensor_size(key, proto, self.max_frames)
    try:
      arrays = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
    except (ValueError, TypeError) as e:
      raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"malformed input tensor: {e}") from e
    outputs = self.run(signature_name, arrays, list(request.output_filter))
    response = predict_pb2.PredictResponse()
    response.model_spec.name = self.model_name
    response.model_spec.version.value = self.version
    response.model_spec.signature_name = signature_name
    for key, value in outputs.items():
      response.outputs[key].CopyFrom(tf.make_tensor_proto(value))
    return response

  def _replay_warmup(self) -> int:
    """Runs `assets.extra/tf_serving_warmup_requests` like TF Serving; a failure fails loading."""
    path = os.path.join(self.path, warmup.WARMUP_FILE)
    if not os.path.exists(path):
      return 0
    count = 0
    for record in tf.data.TFRecordDataset(path):
      count += 1
      if count > warmup.MAX_RECORDS:
        raise ValueError(f"{path} has more than {warmup.MAX_RECORDS} records")
      log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
      if not log.HasField("predict_log"):
        raise ValueError(f"{path} record {count}: only predict_log warm-up is supported")
      request = predict_pb2.PredictRequest()
      request.CopyFrom(log.predict_log.request)
      request.model_spec.name = self.model_name  # TF Serving runs warm-up on this servable.
      request.model_spec.ClearField("version")
      try:
        self.predict(request)
      except RequestError as e:
        raise ValueError(f"{path} record {count} failed: {e.message}") from e
    return count


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
  """gRPC `PredictionService` over a `Servable` (Predict and GetModelMetadata)."""

  def __init__(self, servable: Servable):
    self.servable = servable

  def Predict(self, request, context):
    try:
      return self.servable.predict(request)
    except RequestError as e:
      context.abort(e.code, e.message)

  def GetModelMetadata(self, request, context):
    try:
      self.servable.check_model_spec(request.model_spec)
    except RequestError as e:
      context.abort(e.code, e.message)
    fields = list(request.metadata_field)
    if not fields:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    "GetModelMetadataRequest must specify at least one metadata_field")
    unsupported = [f for f in fields if f != "signature_def"]
    if unsupported:
      context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                    f"Metadata field {unsupported[0]} is not supported")
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = self.servable.model_name
    response.model_spec.version.value = self.servable.version
    response.metadata["signature_def"].Pack(self.servable.signature_defs)
    return response

  def _unimplemented(self, request, context):
    context.abort(grpc.StatusCode.UNIMPLEMENTED,
                  "the testing server implements Predict and GetModelMetadata only")

  Classify = Regress = MultiInference = _unimplemented


_REST_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?(?P<verb>:predict|/metadata)?$")


class _RestHandler(http.server.BaseHTTPRequestHandler):
  """TF Serving's REST routes (columnar `inputs` / `outputs` form only)."""

  servable: Servable  # Set on a per-server subclass.

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    logging.debug("rest: " + format, *args)

  def _reply(self, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def _route(self, want_verb: Optional[str]):
    match = _REST_PATH.match(self.path)
    if not match or match["verb"] != want_verb:
      raise RequestError(grpc.StatusCode.NOT_FOUND, f"no route for {self.command} {self.path}")
    spec = model_pb2.ModelSpec()
    spec.name = match["name"]
    if match["version"]:
      spec.version.value = int(match["version"])
    return spec

  def _handle(self, body_fn) -> None:
    try:
      self._reply(200, body_fn())
    except RequestError as e:
      self._reply(_HTTP_STATUS.get(e.code, 500), {"error": e.message})

  def do_GET(self):  # pylint: disable=invalid-name
    def body():
      is_metadata = self.path.endswith("/metadata")
      self.servable.check_model_spec(self._route("/metadata" if is_metadata else None))
      version = str(self.servable.version)
      if not is_metadata:
        return {"model_version_status": [{"version": version, "state": "AVAILABLE",
                                          "status": {"error_code": "OK", "error_message": ""}}]}
      return {"model_spec": {"name": self.servable.model_name, "signature_name": "",
                             "version": version},
              "metadata": {"signature_def": json_format.MessageToDict(
                  self.servable.signature_defs, preserving_proto_field_name=True)}}
    self._handle(body)

  def do_POST(self):  # pylint: disable=invalid-name
    def body():
      spec = self._route(":predict")
      try:
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
      except ValueError as e:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"JSON parse error: {e}") from e
      if not isinstance(request, dict):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"the body must be a JSON object, got a {type(request).__name__}")
      if not isinstance(request.get("signature_name", ""), str):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "signature_name must be a string")
      if "inputs" not in request:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           "the testing server accepts the columnar form {\"inputs\": {...}} only")
      spec.signature_name = request.get("signature_name", "")
      signature_name = self.servable.check_model_spec(spec)
      sig = self.servable.signature_def(signature_name)
      inputs = request["inputs"]
      if not isinstance(inputs, dict):
        if len(sig.inputs) != 1:
          raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                             f"unnamed inputs need a one-input signature; '{signature_name}' "
                             f"has {sorted(sig.inputs)}")
        inputs = {next(iter(sig.inputs)): inputs}
      arrays = {}
      for key, value in inputs.items():
        np_dtype = (tf.dtypes.as_dtype(sig.inputs[key].dtype).as_numpy_dtype
                    if key in sig.inputs else None)
        arrays[key] = json_array(key, value, np_dtype, self.servable.max_frames)
      check_inputs(signature_name, sig, {
          k: (sig.inputs[k].dtype if k in sig.inputs else types_pb2.DT_INVALID, v.shape)
          for k, v in arrays.items()})
      outputs = self.servable.run(signature_name, arrays)
      return {"outputs": {k: v.tolist() for k, v in outputs.items()}}
    self._handle(body)


class TestingServer:
  """gRPC (and optionally REST) TF Serving stand-in on a loopback address.

  Args:
    model_base_path: TF Serving base path (`<base>/<version>/saved_model.pb`).
    model_name: the model name requests must use.
    model_version: version to serve; 0 = the highest.
    host: address to bind (loopback by default).
    port: gRPC port; 0 = any free port (read `.port` after `start`).
    rest_api_port: REST port; None = no REST server, 0 = any free port.
    max_workers: gRPC handler threads.
    tls_cert_file, tls_key_file: PEM server certificate and key for a TLS gRPC port.
  """

  def __init__(self, model_base_path: str, model_name: str = "asl", model_version: int = 0,
               host: str = "127.0.0.1", port: int = 0, rest_api_port: Optional[int] = None,
               max_workers: int = 4, tls_cert_file: str = "", tls_key_file: str = ""):
    self.servable = Servable(model_base_path, model_name, model_version)
    self.host = host
    self.port = port
    self.rest_api_port = rest_api_port
    self._max_workers = max_workers
    self._tls = (tls_cert_file, tls_key_file) if tls_cert_file else None
    self._grpc_server = None
    self._http_server = None

  @property
  def address(self) -> str:
    """`host:port` of the gRPC endpoint."""
    return f"{self.host}:{self.port}"

  @property
  def rest_address(self) -> str:
    """`host:port` of the REST endpoint."""
    return f"{self.host}:{self.rest_api_port}"

  def start(self) -> "TestingServer":
    """Binds the ports and starts serving in background threads; returns self."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=self._max_workers),
                         options=GRPC_MESSAGE_OPTIONS + (("grpc.so_reuseport", 0),))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(self.servable), server)
    target = f"{self.host}:{self.port}"
    if self._tls:
      with open(self._tls[0], "rb") as c, open(self._tls[1], "rb") as k:
        credentials = grpc.ssl_server_credentials([(k.read(), c.read())])
      self.port = server.add_secure_port(target, credentials)
    else:
      self.port = server.add_insecure_port(target)
    server.start()
    self._grpc_server = server
    if self.rest_api_port is not None:
      handler = type("RestHandler", (_RestHandler,), {"servable": self.servable})
      self._http_server = http.server.ThreadingHTTPServer((self.host, self.rest_api_port),
                                                          handler)
      self.rest_api_port = self._http_server.server_address[1]
      threading.Thread(target=self._http_server.serve_forever, args=(0.1,), daemon=True).start()
    logging.info("serving model %r version %d from %s on grpc %s%s",
                 self.servable.model_name, self.servable.version, self.servable.path,
                 self.address, f", rest {self.rest_address}" if self._http_server else "")
    return self

  def stop(self, grace: Optional[float] = None) -> None:
    """Stops both endpoints."""
    if self._grpc_server is not None:
      self._grpc_server.stop(grace).wait()
      self._grpc_server = None
    if self._http_server is not None:
      self._http_server.shutdown()
      self._http_server.server_close()
      self._http_server = None

  def wait(self) -> None:
    """Blocks until the gRPC server stops."""
    self._grpc_server.wait_for_termination()

  def __enter__(self) -> "TestingServer":
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()


class _StandInModule(tf.Module):
  """Signatures of the real export computed by simple deterministic functions.

  For `features [B, T, C]` and `lengths [B]` (mask `m[b, t] = t < lengths[b]`, `L = lengths`,
  `mean[b]` = mean over valid frames and channels):
    segments_grid[b, k] = (k, k + 1) * L[b] / K,  segments_sec = (grid * stride + nf / 2) / fps,
    scores[b, k] = sigmoid(mean[b] - k + score_bias),  labels[b, k] = k % classes,
    num_detections[b] = min(L[b], K);
    raw_scores: cls_scores = sigmoid(features[..., :classes]) * m, offsets = |features[..., :2]|
    * m, points[t] = (t, 0, 1e4, 1), valid = m.
  """

  def __init__(self, input_dim, num_classes, max_detections, timebase, score_bias):
    super().__init__()
    self.input_dim = input_dim
    self.num_classes = num_classes
    self.max_detections = max_detections
    self.timebase = timebase
    self.score_bias = tf.Variable(score_bias, dtype=tf.float32, trainable=False)
    features = tf.TensorSpec([None, None, input_dim], tf.float32, name="features")
    lengths = tf.TensorSpec([None], tf.int32, name="lengths")
    self.serving_default = tf.function(self._detect, input_signature=[features, lengths])
    self.detect_full = tf.function(self._detect_full, input_signature=[features])
    self.raw_scores = tf.function(self._raw_scores, input_signature=[features, lengths])

  def _mask(self, features, lengths):
    return tf.sequence_mask(lengths, tf.shape(features)[1], dtype=tf.float32)  # [B, T]

  def _detect(self, features, lengths):
    mask = self._mask(features, lengths)
    length = tf.cast(lengths, tf.float32)  # [B]
    mean = (tf.reduce_sum(tf.reduce_mean(features, -1) * mask, -1)
            / tf.maximum(length, 1.0))  # [B]
    k = tf.range(self.max_detections, dtype=tf.float32)  # [K]
    bounds = tf.stack([k, k + 1.0], -1) / self.max_detections  # [K, 2]
    grid = bounds[None] * length[:, None, None]  # [B, K, 2]
    tb = self.timebase
    seconds = (grid * tb["feat_stride"] + 0.5 * tb["num_frames"]) / tb["fps"]
    scores = tf.sigmoid(mean[:, None] - k[None] + self.score_bias)  # [B, K]
    labels = tf.tile(tf.range(self.max_detections)[None] % self.num_classes,
                     [tf.shape(features)[0], 1])
    return {"segments_sec": seconds, "segments_grid": grid, "scores": scores, "labels": labels,
            "num_detections": tf.minimum(lengths, self.max_detections)}

  def _detect_full(self, features):
    shape = tf.shape(features)
    return self._detect(features, tf.fill([shape[0]], shape[1]))

  def _raw_scores(self, features, lengths):
    mask = self._mask(features, lengths)
    t = tf.cast(tf.range(tf.shape(features)[1]), tf.float32)
    ones = tf.ones_like(t)
    return {"cls_scores": tf.sigmoid(features[..., :self.num_classes]) * mask[..., None],
            "offsets": tf.abs(features[..., :2]) * mask[..., None],
            "points": tf.stack([t, 0.0 * ones, 1e4 * ones, ones], -1),
            "valid": mask > 0}


def write_stand_in_model(model_base_path: str, version: int = 1, input_dim: int = 8,
                         num_classes: int = 3, max_detections: int = 5,
                         class_names: Optional[Sequence[str]] = None,
                         timebase: Optional[Mapping[str, float]] = None,
                         score_bias: float = 0.0) -> str:
  """Writes a stand-in SavedModel with the real export's signatures and assets.

  Args:
    model_base_path: TF Serving base path; the model goes to `<base>/<version>`.
    version: version folder.
    input_dim: feature channels C (>= max(2, num_classes)).
    num_classes: classes.
    max_detections: K, detections per video.
    class_names: written to `assets/class_names.txt` (default `class_0` ...).
    timebase: `fps`, `feat_stride`, `num_frames` for `assets/timebase.json`
      (default 30, 16, 16).
    score_bias: added to the score logits (tells versions apart).

  Returns:
    The SavedModel directory.
  """
  if input_dim < max(2, num_classes):
    raise ValueError(f"input_dim={input_dim} must be >= max(2, num_classes={num_classes})")
  timebase = dict(timebase or {"fps": 30.0, "feat_stride": 16.0, "num_frames": 16.0})
  class_names = list(class_names or [f"class_{i}" for i in range(num_classes)])
  module = _StandInModule(input_dim, num_classes, max_detections, timebase, score_bias)
  path = os.path.join(model_base_path, str(version))
  tf.saved_model.save(module, path, signatures={
      "serving_default": module.serving_default.get_concrete_function(),
      "detect_full": module.detect_full.get_concrete_function(),
      "raw_scores": module.raw_scores.get_concrete_function(),
  })
  os.makedirs(os.path.join(path, "assets"), exist_ok=True)
  with open(os.path.join(path, "assets", "class_names.txt"), "w") as f:
    f.write("\n".join(class_names) + "\n")
  with open(os.path.join(path, "assets", "timebase.json"), "w") as f:
    json.dump(timebase, f)
  return path


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the server's command-line flags (named as tensorflow_model_server names them)."""
  flags.DEFINE_string("model_base_path", None, "TF Serving base path (<base>/<version>/).",
                      flag_values=flag_values, required=True)
  flags.DEFINE_string("model_name", "asl", "Model name requests must use.",
                      flag_values=flag_values)
  flags.DEFINE_integer("model_version", 0, "Version to serve (0 = highest).",
                       flag_values=flag_values)
  flags.DEFINE_string("host", "127.0.0.1", "Address to bind.", flag_values=flag_values)
  flags.DEFINE_integer("port", 8500, "gRPC port.", flag_values=flag_values)
  flags.DEFINE_integer("rest_api_port", 0, "REST port (0 = no REST endpoint, as in TF Serving).",
                       flag_values=flag_values)
  flags.DEFINE_integer("grpc_max_threads", 4, "gRPC handler threads.", flag_values=flag_values)
  flags.DEFINE_string("ssl_cert_file", "", "PEM certificate for TLS on the gRPC port.",
                      flag_values=flag_values)
  flags.DEFINE_string("ssl_key_file", "", "PEM private key for TLS on the gRPC port.",
                      flag_values=flag_values)


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  try:
    server = TestingServer(f.model_base_path, f.model_name, f.model_version, host=f.host,
                           port=f.port, rest_api_port=f.rest_api_port or None,
                           max_workers=f.grpc_max_threads, tls_cert_file=f.ssl_cert_file,
                           tls_key_file=f.ssl_key_file).start()
  except (OSError, ValueError, RuntimeError) as e:
    sys.exit(f"asl_tf.serving.testing_server: {e}")
  print(f"testing server (not TF Serving): model {f.model_name!r} version "
        f"{server.servable.version} on grpc {server.address}"
        + (f", rest {server.rest_address}" if f.rest_api_port else ""), flush=True)
  try:
    server.wait()
  except KeyboardInterrupt:
    server.stop(grace=1.0)


if __name__ == "__main__":
  define_flags()
  app.run(main)
