"""Client for an asl_tf model served by TF Serving, over gRPC or REST.

Library:
  client = ASLServingClient("localhost:8500", model_name="asl")
  videos = client.detect([features_a, features_b])  # [T_i, C] each; padded, lengths sent
  videos[0]["segments_sec"], videos[0]["scores"], videos[0]["labels"]

Command line:
  python -m asl_tf.serving.client --server=localhost:8500 --model=asl --features_path=video.npy \
      [--signature=serving_default] [--lengths=2304] [--class_names=classes.txt] \
      [--timeout_sec=60] [--tls_ca=ca.pem] [--rest=localhost:8501]

The client asks the server for the signatures (`GetModelMetadata`) and checks input keys, dtypes
and shapes before sending, retries UNAVAILABLE with bounded exponential backoff (TF Serving opens
its ports only once the model is loaded), and raises gRPC's 4 MB message limits, which a single
long video exceeds ([18432, 2048] float32 features are ~151 MB).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # the command line: TensorFlow's start-up lines hidden before it loads
  from asl_tf import tool_process  # pylint: disable=g-import-not-at-top
  tool_process.prepare_tensorflow(tool_process.argv_verbosity(sys.argv))

import http.client
import json
import os
import ssl
import time
import urllib.error
import urllib.request
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

from absl import app
from absl import flags
from google.protobuf import json_format
import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

from asl_tf import evaluation
from asl_tf import files
from asl_tf.data import features as features_lib

MAX_MESSAGE_BYTES = 2**31 - 1  # TF Serving's own limit; gRPC's default is 4 MB.
DEFAULT_SIGNATURE = "serving_default"
DETECTION_KEYS = ("segments_sec", "segments_grid", "scores", "labels")

_HTTP_TO_GRPC = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    404: grpc.StatusCode.NOT_FOUND,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


class ServingError(Exception):
  """A request the server (or the client's own input check) refused.

  Attributes:
    code: `grpc.StatusCode` (REST errors are mapped from the HTTP status).
    message: the server's message.
  """

  def __init__(self, code: grpc.StatusCode, message: str):
    super().__init__(f"{code.name}: {message}")
    self.code = code
    self.message = message


class ServingUnavailableError(ServingError):
  """The server stayed unreachable for every attempt of the retry budget."""


def grpc_channel_options(reconnect_backoff_ms: int = 100) -> List[tuple]:
  """Channel options: raised message limits and a short reconnect backoff.

  Args:
    reconnect_backoff_ms: gRPC's own reconnect backoff; kept short so that the client's
      retry loop, not the channel, decides how often to try a server that is starting.

  Returns:
    A list of (key, value) channel options.
  """
  return [
      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
      ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
      ("grpc.initial_reconnect_backoff_ms", reconnect_backoff_ms),
      ("grpc.min_reconnect_backoff_ms", reconnect_backoff_ms),
      ("grpc.max_reconnect_backoff_ms", 10 * reconnect_backoff_ms),
  ]


def signature_summary(signature_def) -> Dict[str, Dict[str, tuple]]:
  """`{"inputs"|"outputs": {key: (tf.DType, shape tuple or None)}}` of a SignatureDef."""
  def tensors(infos):
    return {k: (tf.dtypes.as_dtype(v.dtype),
                None if v.tensor_shape.unknown_rank
                else tuple(d.size for d in v.tensor_shape.dim)) for k, v in infos.items()}
  return {"inputs": tensors(signature_def.inputs), "outputs": tensors(signature_def.outputs)}


def check_inputs(signature_name: str, signature_def, inputs: Mapping[str, np.ndarray]) -> None:
  """Checks keys, dtypes and shapes of inputs against a SignatureDef before sending.

  Raises:
    ServingError: INVALID_ARGUMENT naming the input and the expected dtype and shape.
  """
  want = signature_summary(signature_def)["inputs"]
  def describe(key):
    dtype, shape = want[key]
    return f"{dtype.name} {list(shape) if shape is not None else '?'}"
  missing, extra = sorted(set(want) - set(inputs)), sorted(set(inputs) - set(want))
  if missing or extra:
    expected = ", ".join(f"{k}: {describe(k)}" for k in sorted(want))
    problems = [f"missing input '{k}'" for k in missing] + [
        f"unexpected input '{k}'" for k in extra]
    raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                       f"client-side check: signature '{signature_name}': {', '.join(problems)}; "
                       f"expected inputs {{{expected}}}")
  for key, value in sorted(inputs.items()):
    dtype, shape = want[key]
    value = np.asarray(value)
    bad_shape = shape is not None and (
        value.ndim != len(shape) or any(d not in (-1, s) for d, s in zip(shape, value.shape)))
    if value.dtype != dtype.as_numpy_dtype or bad_shape:
      raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                         f"client-side check: input '{key}' of signature '{signature_name}' is "
                         f"{value.dtype.name} {list(value.shape)}; expected {describe(key)}")


def pad_videos(videos: Sequence[np.ndarray]) -> tuple:
  """Stacks `[T_i, C]` arrays into zero-padded `[B, max T, C]` float32 and `lengths [B]` int32."""
  lengths = np.array([len(v) for v in videos], np.int32)
  batch = np.zeros((len(videos), int(lengths.max()), videos[0].shape[-1]), np.float32)
  for i, v in enumerate(videos):
    batch[i, :len(v)] = v
  return batch, lengths


class ASLServingClient:
  """Client for the asl_tf SavedModel behind TF Serving (or the testing server).

  Args:
    server: gRPC `host:port` (used unless `rest` is given).
    model_name: model name in TF Serving.
    model_version: version to address (None = the server's latest).
    rest: REST `host:port` or `http(s)://host:port`; selects the JSON transport.
    timeout_sec: deadline of each attempt.
    tls_ca: PEM root certificates file; enables TLS (gRPC) or verifies https (REST).
    max_attempts: attempts per request when the server is UNAVAILABLE (>= 1).
    initial_backoff_sec: sleep after the first failed attempt; doubles after each.
    max_backoff_sec: cap of one sleep.
    validate_inputs: check inputs against the served signature before sending.
    class_names: label names indexed by label id (None = integer labels only).
    on_retry: called with one line before each retry sleep (e.g. to tell a person waiting
      that the server is not up yet); None = silent.
  """

  def __init__(self, server: str = "", model_name: str = "asl",
               model_version: Optional[int] = None, rest: str = "", timeout_sec: float = 60.0,
               tls_ca: str = "", max_attempts: int = 6, initial_backoff_sec: float = 0.5,
               max_backoff_sec: float = 8.0, validate_inputs: bool = True,
               class_names: Optional[Sequence[str]] = None,
               on_retry: Optional[Callable[[str], None]] = None):
    if not server and not rest:
      raise ValueError("give a gRPC server (host:8500) or a REST endpoint (host:8501)")
    if max_attempts < 1:
      raise ValueError(f"max_attempts={max_attempts} must be >= 1")
    self.server = server
    self.model_name = model_name
    self.model_version = model_version
    self.rest = rest
    self.timeout_sec = timeout_sec
    self.tls_ca = tls_ca
    self.max_attempts = max_attempts
    self.initial_backoff_sec = initial_backoff_sec
    self.max_backoff_sec = max_backoff_sec
    self.validate_inputs = validate_inputs
    self.class_names = list(class_names) if class_names is not None else None
    self.on_retry = on_retry
    self._signature_defs = None
    self._channel = None
    self._stub = None
    self._ssl_context = None
    if rest:
      scheme = "" if "://" in rest else ("https://" if tls_ca else "http://")
      self._rest_base = f"{scheme}{rest.rstrip('/')}/v1/models/{model_name}" + (
          f"/versions/{model_version}" if model_version else "")
      if tls_ca:
        self._ssl_context = ssl.create_default_context(cafile=tls_ca)
    else:
      if tls_ca:
        with open(tls_ca, "rb") as f:
          credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
        self._channel = grpc.secure_channel(server, credentials, grpc_channel_options())
      else:
        self._channel = grpc.insecure_channel(server, grpc_channel_options())
      self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

  @property
  def target(self) -> str:
    """The endpoint this client talks to."""
    return self._rest_base if self.rest else self.server

  def close(self) -> None:
    """Closes the gRPC channel."""
    if self._channel is not None:
      self._channel.close()

  def __enter__(self) -> "ASLServingClient":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _with_retries(self, call):
    """Runs `call()`, retrying UNAVAILABLE with exponential backoff, at most max_attempts."""
    start, backoff = time.monotonic(), self.initial_backoff_sec
    for attempt in range(1, self.max_attempts + 1):
      try:
        return call()
      except ServingError as e:
        if e.code != grpc.StatusCode.UNAVAILABLE:
          raise
        if attempt == self.max_attempts:
          raise ServingUnavailableError(
              grpc.StatusCode.UNAVAILABLE,
              f"{self.target} unavailable after {attempt} attempts over "
              f"{time.monotonic() - start:.1f} s (is the server running and the port right?); "
              f"last error: {e.message}") from e
        if self.on_retry is not None:
          self.on_retry(f"{self.target} unavailable ({e.message.strip() or 'no answer'}); "
                        f"retrying in {backoff:.1f} s (attempt {attempt + 1} of "
                        f"{self.max_attempts})")
        time.sleep(backoff)
        backoff = min(2 * backoff, self.max_backoff_sec)

  def _grpc(self, method, request):
    try:
      return method(request, timeout=self.timeout_sec)
    except grpc.RpcError as e:
      raise ServingError(e.code(), e.details() or "") from e

  def _http(self, url: str, body: Optional[dict] = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data,
                                     headers={"Content-Type": "application/json"})
    try:
      with urllib.request.urlopen(request, timeout=self.timeout_sec,
                                  context=self._ssl_context) as response:
        return json.loads(response.read())
    except urllib.error.HTTPError as e:
      try:
        message = json.loads(e.read()).get("error", str(e))
      except ValueError:
        message = str(e)
      raise ServingError(_HTTP_TO_GRPC.get(e.code, grpc.StatusCode.UNKNOWN), message) from e
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
      code = (grpc.StatusCode.DEADLINE_EXCEEDED if isinstance(getattr(e, "reason", e),
                                                              TimeoutError)
              else grpc.StatusCode.UNAVAILABLE)
      raise ServingError(code, str(getattr(e, "reason", e))) from e
    except (http.client.HTTPException, ValueError) as e:  # not an HTTP / JSON answer
      raise ServingError(grpc.StatusCode.UNKNOWN,
                         f"{url} did not answer as TF Serving's REST API ({type(e).__name__}); "
                         "check --rest: host:port of its REST API (8501 by default), not the "
                         "gRPC one") from e

  def signature_defs(self) -> Dict[str, object]:
    """The served signatures (cached): name -> `SignatureDef`, via GetModelMetadata."""
    if self._signature_defs is None:
      sig_map = get_model_metadata_pb2.SignatureDefMap()
      if self.rest:
        body = self._with_retries(lambda: self._http(self._rest_base + "/metadata"))
        json_format.ParseDict(body["metadata"]["signature_def"], sig_map)
      else:
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = self.model_name
        if self.model_version:
          request.model_spec.version.value = self.model_version
        response = self._with_retries(lambda: self._grpc(self._stub.GetModelMetadata, request))
        response.metadata["signature_def"].Unpack(sig_map)
      self._signature_defs = dict(sig_map.signature_def)
    return self._signature_defs

  def predict(self, inputs: Mapping[str, np.ndarray], signature: str = DEFAULT_SIGNATURE,
              output_filter: Sequence[str] = ()) -> Dict[str, np.ndarray]:
    """Runs one signature.

    Args:
      inputs: input key -> array.
      signature: signature name.
      output_filter: output keys to return (empty = all); applied by the server over gRPC, by
        the client over REST.

    Returns:
      Output key -> array.

    Raises:
      ServingError: the server or the client-side check refused the request.
      ServingUnavailableError: the server stayed unreachable for every attempt.
    """
    inputs = {k: np.asarray(v) for k, v in inputs.items()}
    if self.validate_inputs:
      sigs = self.signature_defs()
      if signature not in sigs:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"client-side check: signature '{signature}' is not served; "
                           f"available: {sorted(sigs)}")
      check_inputs(signature, sigs[signature], inputs)
    if self.rest:
      return self._predict_rest(inputs, signature, output_filter)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = self.model_name
    request.model_spec.signature_name = signature
    if self.model_version:
      request.model_spec.version.value = self.model_version
    for key, value in inputs.items():
      request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    request.output_filter.extend(output_filter)
    response = self._with_retries(lambda: self._grpc(self._stub.Predict, request))
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}

  def _predict_rest(self, inputs, signature, output_filter):
    body = {"signature_name": signature, "inputs": {k: v.tolist() for k, v in inputs.items()}}
    outputs = self._with_retries(lambda: self._http(self._rest_base + ":predict", body))["outputs"]
    # JSON loses dtypes: restore them from the signature (TF Serving returns a bare value for
    # one-output signatures).
    summary = signature_summary(self.signature_defs()[signature])["outputs"]
    dtypes = {k: d.as_numpy_dtype for k, (d, _) in summary.items()}
    if not isinstance(outputs, dict):
      outputs = {next(iter(summary)): outputs}
    keys = output_filter or sorted(outputs)
    return {k: np.asarray(outputs[k], dtype=dtypes.get(k)) for k in keys}

  def detect(self, features: Union[np.ndarray, Sequence[np.ndarray]],
             lengths: Optional[Sequence[int]] = None,
             signature: str = DEFAULT_SIGNATURE) -> List[Dict[str, object]]:
    """Detects actions in a batch of videos.

    Args:
      features: `[B, T, C]` or `[T, C]` float32 features, or a list of `[T_i, C]` arrays
        (padded here; their lengths are sent).
      lengths: valid frames per video (default: all frames of each array). Ignored by the
        `detect_full` signature, which takes no lengths.
      signature: `serving_default` (features + lengths) or `detect_full` (features only).

    Returns:
      One dict per video with the first `num_detections` detections: `segments_sec [D, 2]`,
      `segments_grid [D, 2]`, `scores [D]`, `labels [D]` (arrays) and `label_names` (list of
      str; the class names, else the label ids as strings).
    """
    if isinstance(features, (list, tuple)):
      batch, own_lengths = pad_videos([np.asarray(v, np.float32) for v in features])
    else:
      batch = np.asarray(features, np.float32)
      batch = batch[None] if batch.ndim == 2 else batch
      own_lengths = np.full([batch.shape[0]], batch.shape[1], np.int32)
    lengths = own_lengths if lengths is None else np.asarray(lengths, np.int32)
    inputs = {"features": batch}
    if signature != "detect_full":
      inputs["lengths"] = lengths
    outputs = self.predict(inputs, signature)
    videos = []
    for b in range(batch.shape[0]):
      n = int(outputs["num_detections"][b])
      video = {k: outputs[k][b, :n] for k in DETECTION_KEYS}
      video["label_names"] = [self.label_name(int(k)) for k in video["labels"]]
      videos.append(video)
    return videos

  def label_name(self, label: int) -> str:
    """The class name of a label id (its integer as a string without class names)."""
    if self.class_names is not None and 0 <= label < len(self.class_names):
      return self.class_names[label]
    return str(label)


def to_activitynet(video: Mapping[str, object]) -> List[Dict[str, object]]:
  """One video's detections as ActivityNet results entries (segment in seconds)."""
  return [{"segment": [float(s), float(e)], "label": name, "label_id": int(label),
           "score": float(score)}
          for (s, e), name, label, score in zip(video["segments_sec"], video["label_names"],
                                                video["labels"], video["scores"])]


def read_class_names(path: str) -> List[str]:
  """One class name per line (the exported `assets/class_names.txt`).

  Raises:
    ValueError: the file is not UTF-8 text.
  """
  try:
    with open(path, encoding="utf-8") as f:
      return [line.strip() for line in f if line.strip()]
  except UnicodeDecodeError as e:
    raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); it holds one "
                     "class name per line (an export's assets/class_names.txt)") from None


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the client's command-line flags (separate from the training flags)."""
  fv = flag_values
  flags.DEFINE_string("server", "localhost:8500", "TF Serving gRPC host:port.", flag_values=fv)
  flags.DEFINE_string("rest", "", "TF Serving REST host:port; if set, REST is used instead of "
                      "gRPC.", flag_values=fv)
  flags.DEFINE_string("model", "asl", "Model name.", flag_values=fv)
  flags.DEFINE_integer("model_version", 0, "Model version (0 = latest).", flag_values=fv)
  flags.DEFINE_string("signature", DEFAULT_SIGNATURE, "serving_default or detect_full.",
                      flag_values=fv)
  flags.DEFINE_string("features_path", None, ".npy features, [T, C] or [B, T, C] float32 (as "
                      "asl_tf.infer's --features_path; --features is the same flag).",
                      flag_values=fv, required=True)
  flags.DEFINE_alias("features", "features_path", flag_values=fv)
  flags.DEFINE_list("lengths", [], "Valid frames per video (default: all).", flag_values=fv)
  flags.DEFINE_string("class_names", "", "Class names file, one per line (default: label ids).",
                      flag_values=fv)
  flags.DEFINE_float("timeout_sec", 60.0, "Deadline of each attempt.", flag_values=fv)
  flags.DEFINE_string("tls_ca", "", "PEM root certificates; enables TLS.", flag_values=fv)
  flags.DEFINE_integer("max_attempts", 6, "Attempts while the server is UNAVAILABLE.",
                       flag_values=fv)
  flags.DEFINE_float("initial_backoff_sec", 0.5, "First retry backoff (doubles).", flag_values=fv)
  flags.DEFINE_boolean("validate_inputs", True, "Check inputs against the served signature "
                       "(GetModelMetadata) before sending.", flag_values=fv)
  flags.DEFINE_integer("max_print", 20, "Detections printed per video (all go to --output_json).",
                       flag_values=fv)
  flags.DEFINE_string("output_json", "", "Write all detections here (ActivityNet layout); an "
                      "existing file is replaced only if it is a results file, or with "
                      "--overwrite.", flag_values=fv)
  flags.DEFINE_boolean("overwrite", False, "Replace an existing --output_json that is not an "
                       "ActivityNet results file.", flag_values=fv)


def _flag_problem(fv: flags.FlagValues) -> str:
  """What is wrong with the flags' values or the files they name, or ''."""
  if not fv.server and not fv.rest:
    return "--server and --rest are both empty; give a gRPC host:8500 or a REST host:8501"
  for flag, low in (("max_attempts", 1), ("timeout_sec", 1e-3), ("initial_backoff_sec", 0.0)):
    value = getattr(fv, flag)
    if not value >= low or value == float("inf"):
      return f"--{flag}={value} must be a finite number >= {low:g}"
  for flag in ("class_names", "tls_ca"):
    path = getattr(fv, flag)
    if path and not os.path.isfile(path):
      return f"--{flag}={path} does not exist"
  if fv.output_json:
    folder = os.path.dirname(os.path.abspath(fv.output_json))
    if os.path.isdir(fv.output_json):
      return f"--output_json={fv.output_json} is a folder; name a .json file"
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
      return f"--output_json={fv.output_json}: folder {folder} does not exist or is not writable"
    if (os.path.exists(fv.output_json) and not fv.overwrite
        and not evaluation.is_results_file(fv.output_json)):
      return (f"--output_json={fv.output_json} exists and is not an ActivityNet results file; "
              "choose another path or pass --overwrite to replace it")
  return ""


def run(fv: flags.FlagValues = flags.FLAGS, out=sys.stdout) -> int:
  """Runs the command line on parsed flags; returns the process exit code."""
  try:
    features = features_lib.read_feature_file(fv.features_path, ranks=(2, 3))
  except features_lib.FeatureError as e:
    print(f"asl_tf.serving.client: --features_path: {e}", file=sys.stderr)
    return 2
  try:
    lengths = [int(n) for n in fv.lengths] or None
  except ValueError:
    print(f"asl_tf.serving.client: --lengths={','.join(fv.lengths)}: expected comma-separated "
          "integers (valid frames per video)", file=sys.stderr)
    return 2
  problem = _flag_problem(fv)
  if problem:
    print(f"asl_tf.serving.client: {problem} (checked before sending the request)",
          file=sys.stderr)
    return 2
  try:
    class_names = read_class_names(fv.class_names) if fv.class_names else None
  except ValueError as e:
    print(f"asl_tf.serving.client: --class_names={e}", file=sys.stderr)
    return 2
  client = ASLServingClient(
      fv.server, model_name=fv.model, model_version=fv.model_version or None, rest=fv.rest,
      timeout_sec=fv.timeout_sec, tls_ca=fv.tls_ca, max_attempts=fv.max_attempts,
      initial_backoff_sec=fv.initial_backoff_sec, validate_inputs=fv.validate_inputs,
      class_names=class_names, on_retry=lambda line: print(line, file=sys.stderr, flush=True))
  try:
    videos = client.detect(features, lengths, signature=fv.signature)
  except ServingError as e:
    print(f"error from {client.target}: {e}", file=sys.stderr)
    return 1
  finally:
    client.close()
  results = {}
  for i, video in enumerate(videos):
    entries = to_activitynet(video)
    results[str(i)] = entries
    print(f"video {i}: {len(entries)} detections", file=out)
    for d in entries[:fv.max_print]:
      print(f"  {d['segment'][0]:9.2f} s - {d['segment'][1]:9.2f} s  {d['score']:.4f}  "
            f"{d['label']}", file=out)
  if fv.output_json:
    files.write_json_atomic(fv.output_json, {"results": results}, indent=1)
  if not fv.class_names:
    print("labels are class ids: pass --class_names=<export_dir>/<version>/assets/"
          "class_names.txt (written by asl_tf.export) for names", file=sys.stderr)
  return 0


def main(argv: Sequence[str]) -> None:
  del argv
  sys.exit(run())


if __name__ == "__main__":
  define_flags()
  app.run(main)
