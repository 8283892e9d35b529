"""ASLServingClient and its command line against the testing server and the stand-in model."""

import io
import json
import re
import shutil
import socket
import subprocess
import threading
import time

from absl import flags
import grpc
import numpy as np
import pytest

from asl_tf.serving import client as client_lib
from asl_tf.serving import testing_server

DETECTION_KEYS = ("segments_sec", "segments_grid", "scores", "labels")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _videos(lengths, channels=8, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=(n, channels)).astype(np.float32) for n in lengths]


@pytest.fixture(scope="module")
def grpc_client(server, stand_in):
  with client_lib.ASLServingClient(server.address, class_names=stand_in.class_names,
                                   timeout_sec=20) as c:
    yield c


def _assert_video_equals(video, want, b):
  n = int(want["num_detections"][b])
  for key in DETECTION_KEYS:
    assert video[key].dtype == want[key].dtype, key
    np.testing.assert_array_equal(video[key], want[key][b, :n], err_msg=key)


def test_detect_batch_1_equals_the_savedmodel_signature(grpc_client, stand_in):
  (features,) = _videos([23])
  (video,) = grpc_client.detect(features)
  want = stand_in.call("serving_default", features=features[None],
                       lengths=np.array([23], np.int32))
  _assert_video_equals(video, want, 0)
  assert len(video["scores"]) == stand_in.max_detections
  assert video["label_names"] == [stand_in.class_names[k] for k in video["labels"]]


def test_detect_batch_4_with_different_lengths(grpc_client, stand_in):
  lengths = [30, 7, 2, 19]
  videos = _videos(lengths, seed=1)
  got = grpc_client.detect(videos)
  batch, sent_lengths = client_lib.pad_videos(videos)
  assert batch.shape == (4, 30, stand_in.input_dim) and list(sent_lengths) == lengths
  want = stand_in.call("serving_default", features=batch, lengths=sent_lengths)
  for b, video in enumerate(got):
    _assert_video_equals(video, want, b)
  assert [len(v["scores"]) for v in got] == [min(n, stand_in.max_detections) for n in lengths]
  # Padding is masked: each video alone gives the same detections.
  alone = grpc_client.detect(videos[1])[0]
  np.testing.assert_allclose(alone["scores"], got[1]["scores"], rtol=1e-6)


def test_detect_full_and_explicit_lengths(grpc_client, stand_in):
  batch = np.stack(_videos([12, 12], seed=2))
  full = grpc_client.detect(batch, signature="detect_full")
  want = stand_in.call("detect_full", features=batch)
  for b, video in enumerate(full):
    _assert_video_equals(video, want, b)
  short = grpc_client.detect(batch, lengths=[12, 5])
  want = stand_in.call("serving_default", features=batch, lengths=np.array([12, 5], np.int32))
  _assert_video_equals(short[1], want, 1)
  assert not np.array_equal(short[1]["segments_grid"], full[1]["segments_grid"][:5])


def test_signature_defs_from_metadata(grpc_client):
  sigs = grpc_client.signature_defs()
  assert set(sigs) == {"serving_default", "detect_full", "raw_scores"}
  summary = client_lib.signature_summary(sigs["raw_scores"])
  assert set(summary["inputs"]) == {"features", "lengths"}
  assert set(summary["outputs"]) == {"cls_scores", "offsets", "points", "valid"}
  assert summary["inputs"]["features"][1] == (-1, -1, 8)


@pytest.mark.parametrize("validate", [True, False])
@pytest.mark.parametrize("make_inputs, patterns", [
    (lambda f: {"features": f.astype(np.float64), "lengths": np.array([4], np.int32)},
     ["'features'", "float64|DT_DOUBLE", r"expected (float32|DT_FLOAT) \[-1, ?-1, ?8\]"]),
    (lambda f: {"features": f[0], "lengths": np.array([4], np.int32)},
     ["'features'", r"\[4, ?8\]", r"\[-1, ?-1, ?8\]"]),
    (lambda f: {"features": f}, ["missing input 'lengths'", r"(int32|DT_INT32) \[-1\]"]),
])
def test_invalid_inputs_client_and_server_side(server, validate, make_inputs, patterns):
  features = np.stack(_videos([4], seed=3))
  with client_lib.ASLServingClient(server.address, validate_inputs=validate) as c:
    with pytest.raises(client_lib.ServingError) as info:
      c.predict(make_inputs(features))
  assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
  # With validation off the request reaches the server, whose message says so.
  assert ("client-side check" in info.value.message) == validate
  for pattern in patterns:
    assert re.search(pattern, info.value.message), (pattern, info.value.message)


@pytest.mark.parametrize("transport", ["grpc", "rest"])
def test_unknown_model_is_not_found(server, transport):
  kwargs = {"rest": server.rest_address} if transport == "rest" else {}
  with client_lib.ASLServingClient(server.address, model_name="nope", **kwargs) as c:
    with pytest.raises(client_lib.ServingError) as info:
      c.detect(_videos([4])[0])
  assert info.value.code == grpc.StatusCode.NOT_FOUND
  assert "nope" in info.value.message


def test_rest_equals_grpc(server, grpc_client, stand_in):
  videos = _videos([9, 16, 3], seed=4)
  with client_lib.ASLServingClient(rest=server.rest_address,
                                   class_names=stand_in.class_names) as rest:
    for got, want in zip(rest.detect(videos), grpc_client.detect(videos)):
      for key in DETECTION_KEYS:
        assert got[key].dtype == want[key].dtype
        np.testing.assert_array_equal(got[key], want[key])
      assert got["label_names"] == want["label_names"]
    inputs = {"features": np.stack(_videos([6, 6], seed=5)),
              "lengths": np.array([6, 2], np.int32)}
    raw_rest = rest.predict(inputs, "raw_scores")
  raw_grpc = grpc_client.predict(inputs, "raw_scores")
  assert raw_rest["valid"].dtype == np.bool_ and raw_rest["valid"].sum() == 8
  for key, value in raw_grpc.items():
    np.testing.assert_array_equal(raw_rest[key], value, err_msg=key)


def test_retries_until_a_late_server_is_up(stand_in):
  port = _free_port()
  late = testing_server.TestingServer(stand_in.base_path, port=port)  # Loaded, not listening.
  timer = threading.Timer(0.8, late.start)
  timer.start()
  notices = []
  try:
    with client_lib.ASLServingClient(f"127.0.0.1:{port}", max_attempts=12,
                                     initial_backoff_sec=0.1, max_backoff_sec=0.4,
                                     timeout_sec=5, on_retry=notices.append) as c:
      start = time.monotonic()
      videos = c.detect(_videos([10])[0])
      elapsed = time.monotonic() - start
  finally:
    timer.join()
    late.stop()
  assert len(videos[0]["scores"]) == stand_in.max_detections
  assert 0.7 < elapsed < 5.0
  # A person waiting is told each retry: 0.1, 0.2, 0.4, 0.4 ... s until the server is up.
  assert len(notices) >= 3
  assert re.fullmatch(rf"127\.0\.0\.1:{port} unavailable \(.*\); retrying in 0\.1 s "
                      r"\(attempt 2 of 12\)", notices[0])
  assert "retrying in 0.2 s (attempt 3 of 12)" in notices[1]


@pytest.mark.parametrize("transport", ["grpc", "rest"])
def test_dead_port_fails_after_bounded_retries(transport):
  address = f"127.0.0.1:{_free_port()}"
  kwargs = {"rest": address} if transport == "rest" else {}
  with client_lib.ASLServingClient(address, max_attempts=3, initial_backoff_sec=0.1,
                                   timeout_sec=2, **kwargs) as c:
    start = time.monotonic()
    with pytest.raises(client_lib.ServingUnavailableError) as info:
      c.detect(_videos([4])[0])
    elapsed = time.monotonic() - start
  assert info.value.code == grpc.StatusCode.UNAVAILABLE
  assert "unavailable after 3 attempts" in info.value.message
  assert address in info.value.message
  assert 0.3 <= elapsed < 3.0  # Slept 0.1 + 0.2 s; no attempt waited for its deadline.


def test_errors_other_than_unavailable_are_not_retried(server):
  with client_lib.ASLServingClient(server.address, model_name="nope", max_attempts=5,
                                   initial_backoff_sec=1.0) as c:
    start = time.monotonic()
    with pytest.raises(client_lib.ServingError):
      c.signature_defs()
  assert time.monotonic() - start < 0.9


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
  if not shutil.which("openssl"):
    pytest.skip("openssl is needed to make a test certificate")
  d = tmp_path_factory.mktemp("tls")
  subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                  "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                  "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                  "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                 check=True, capture_output=True, timeout=30)
  return str(d / "cert.pem"), str(d / "key.pem")


def test_tls(stand_in, tls_files):
  cert, key = tls_files
  with testing_server.TestingServer(stand_in.base_path, tls_cert_file=cert,
                                    tls_key_file=key) as tls_server:
    with client_lib.ASLServingClient(tls_server.address, tls_ca=cert) as c:
      (video,) = c.detect(_videos([6])[0])
    assert len(video["scores"]) == stand_in.max_detections
    with client_lib.ASLServingClient(tls_server.address, max_attempts=1) as plain:
      with pytest.raises(client_lib.ServingError) as info:
        plain.signature_defs()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


def _run_cli(argv):
  fv = flags.FlagValues()
  client_lib.define_flags(fv)
  fv(["client"] + argv)
  out = io.StringIO()
  return client_lib.run(fv, out), out.getvalue()


def test_command_line_prints_seconds_and_label_names(server, stand_in, tmp_path):
  batch = np.stack(_videos([20, 20], seed=6))
  np.save(tmp_path / "video.npy", batch)
  (tmp_path / "classes.txt").write_text("\n".join(stand_in.class_names) + "\n")
  code, out = _run_cli([f"--server={server.address}", f"--features={tmp_path / 'video.npy'}",
                        "--lengths=20,10", f"--class_names={tmp_path / 'classes.txt'}",
                        f"--output_json={tmp_path / 'dets.json'}", "--max_print=2"])
  assert code == 0
  want = stand_in.call("serving_default", features=batch, lengths=np.array([20, 10], np.int32))
  lines = out.splitlines()
  assert lines[0] == "video 0: 5 detections"
  s, e = want["segments_sec"][0, 0]
  assert lines[1].split() == [f"{s:.2f}", "s", "-", f"{e:.2f}", "s",
                              f"{want['scores'][0, 0]:.4f}", "walk"]
  assert "video 1: 5 detections" in lines
  assert len(lines) == 6  # Two headers, two detections each.
  results = json.loads((tmp_path / "dets.json").read_text())["results"]
  first = results["1"][0]
  assert first["label"] == "walk" and first["label_id"] == 0
  np.testing.assert_allclose(first["segment"], want["segments_sec"][1, 0], atol=1e-3)
  np.testing.assert_allclose(first["score"], want["scores"][1, 0], atol=1e-5)


def test_command_line_rest_and_errors(server, tmp_path, capsys):
  np.save(tmp_path / "video.npy", _videos([8])[0])
  code, out = _run_cli(["--server=unused:1", f"--rest={server.rest_address}",
                        f"--features_path={tmp_path / 'video.npy'}", "--signature=detect_full"])
  assert code == 0 and out.splitlines()[0] == "video 0: 5 detections"
  assert out.splitlines()[1].split()[-1] == "0"  # No class names: label ids, and where names are.
  assert "labels are class ids: pass --class_names=<export_dir>/<version>/assets/class_names" \
      in capsys.readouterr().err
  code, out = _run_cli([f"--server={server.address}", "--model=nope",
                        f"--features={tmp_path / 'video.npy'}"])
  assert code == 1 and not out


def test_rest_pointed_at_the_grpc_port_is_one_line(server, tmp_path, capsys):
  """The 8500 / 8501 mix-up: the gRPC port's binary answer was an http.client traceback."""
  np.save(tmp_path / "video.npy", _videos([8])[0])
  code, out = _run_cli(["--server=unused:1", f"--rest={server.address}", "--max_attempts=1",
                        f"--features_path={tmp_path / 'video.npy'}"])
  err = capsys.readouterr().err
  assert code == 1 and not out and "Traceback" not in err
  assert re.search(r"did not answer as TF Serving's REST API \(\w+\); check --rest: "
                   r"host:port of its REST API", err)


def test_output_json_never_replaces_a_file_it_did_not_write(server, tmp_path, capsys):
  """--output_json overwrote any file (an annotation file, say) without a word."""
  np.save(tmp_path / "video.npy", np.stack(_videos([20], seed=7)))
  precious = tmp_path / "annotations.json"
  precious.write_text('{"database": {}}')
  argv = [f"--server={server.address}", f"--features={tmp_path / 'video.npy'}",
          f"--output_json={precious}"]
  code, out = _run_cli(argv)
  err = capsys.readouterr().err
  assert code == 2 and not out and precious.read_text() == '{"database": {}}'
  assert re.search(r"annotations.json exists and is not an ActivityNet results file; .* "
                   r"--overwrite", err) and len(err.strip().splitlines()) == 1
  assert _run_cli(argv + ["--overwrite"])[0] == 0
  assert "0" in json.loads(precious.read_text())["results"]
  assert _run_cli(argv)[0] == 0  # its own results file: replaced


@pytest.mark.parametrize("setup,extra,message", [
    (None, [], "does not exist"),
    (lambda d: np.save(d / "video.npy", np.zeros([5], np.float32)), [],
     r"shape \(5,\); expected \[T, C\] or \[B, T, C\]"),
    (lambda d: np.save(d / "video.npy", np.zeros([5, 4], np.float32)), ["--lengths=abc"],
     "--lengths=abc: expected comma-separated integers"),
    (lambda d: np.save(d / "video.npy", np.zeros([5, 4], np.float32)),
     ["--output_json=/nonexistent/dir/out.json"], "folder /nonexistent/dir does not exist"),
    # ValueError / UnicodeDecodeError tracebacks before (a zero --timeout_sec: a request that
    # could only time out).
    (lambda d: np.save(d / "video.npy", np.zeros([5, 4], np.float32)), ["--max_attempts=0"],
     r"--max_attempts=0 must be a finite number >= 1"),
    (lambda d: np.save(d / "video.npy", np.zeros([5, 4], np.float32)), ["--timeout_sec=0"],
     r"--timeout_sec=0.0 must be a finite number >= 0.001"),
    (lambda d: np.save(d / "video.npy", np.zeros([5, 4], np.float32)), ["--server=", "--rest="],
     r"--server and --rest are both empty"),
    (lambda d: (np.save(d / "video.npy", np.zeros([5, 4], np.float32)),
                (d / "names.txt").write_bytes(b"caf\xe9\n")), ["--class_names={d}/names.txt"],
     r"--class_names=\S+names.txt is not UTF-8 text \(invalid continuation byte at byte 3\)"),
])
def test_command_line_input_errors_are_one_line_before_any_request(tmp_path, capsys, setup,
                                                                   extra, message):
  """No server is contacted (the address is dead): every check runs before the request."""
  if setup:
    setup(tmp_path)
  code, out = _run_cli(["--server=127.0.0.1:1", "--max_attempts=1",
                        f"--features={tmp_path / 'video.npy'}"]
                       + [arg.format(d=tmp_path) for arg in extra])
  err = capsys.readouterr().err
  assert code == 2 and not out
  assert re.search(message, err) and len(err.strip().splitlines()) == 1


def test_client_raises_grpc_message_limits(grpc_client):
  # ~6.4 MB request, ~7 MB response: both above gRPC's 4 MB default.
  frames = 200_000
  outputs = grpc_client.predict({"features": _videos([frames])[0][None],
                                 "lengths": np.array([frames], np.int32)}, "raw_scores")
  assert outputs["cls_scores"].shape == (1, frames, 3)
  options = dict(client_lib.grpc_channel_options())
  assert options["grpc.max_send_message_length"] >= 18432 * 2048 * 4 + (1 << 20)
  assert options["grpc.max_receive_message_length"] >= 18432 * 2048 * 4 + (1 << 20)


@pytest.mark.slow  # Not for time (~5 s) but for ~2 GB peak memory on a shared CI host.
def test_a_150_mb_request_round_trips(tmp_path):
  testing_server.write_stand_in_model(str(tmp_path), input_dim=2048, num_classes=20)
  features = np.ones((18432, 2048), np.float32)  # ~151 MB of float32.
  with testing_server.TestingServer(str(tmp_path)) as big, \
      client_lib.ASLServingClient(big.address, timeout_sec=120) as c:
    (video,) = c.detect(features)
  np.testing.assert_allclose(video["segments_grid"][-1], [18432 * 4 / 5, 18432], rtol=1e-6)
