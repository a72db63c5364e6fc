"""The grading service for real: uvicorn on a free port in a thread, the tiny exported bundle, httpx as client."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from edgeretina.dataset import read_labels  # noqa: E402
from edgeretina.errors import ConfigError, MissingDependencyError  # noqa: E402
from edgeretina.runtime.store import ResultStore  # noqa: E402
from edgeretina.serve.app import create_app  # noqa: E402
from edgeretina.serve.config import ServeConfig  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"
KEY = "k" * 8 + "0123456789abcdef"
RECORD_FIELDS = ("file", "dicom", "gradable", "quality", "grade", "grade_name", "probabilities", "referable_probability",
                 "referable", "screening", "neighbors", "knn_grade", "lesions", "timings_ms", "overlay", "error")


class LiveServer:
    """A real uvicorn serving create_app(config) on 127.0.0.1:<free port> (or the config's host), in a thread."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.app = create_app(config)
        self.service = self.app.state.service
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=config.host, port=0, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        assert self.service.wait_loaded(60)
        return self

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def _config(bundle, data: Path, **overrides) -> ServeConfig:
    options = dict(bundle=bundle, port=0, data=data, threads=1, max_upload_mb=1)
    options.update(overrides)
    return ServeConfig(**options)


@pytest.fixture(scope="module")
def photos(phantom_test) -> list[Path]:
    return [Path(item.path) for item in read_labels(phantom_test)]


@pytest.fixture(scope="module")
def server(onnx_bundle, tmp_path_factory):
    with LiveServer(_config(onnx_bundle, tmp_path_factory.mktemp("serve") / "data")) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    with server.client() as c:
        yield c


def _grade(client, photo: Path, name: str | None = None) -> httpx.Response:
    return client.post("/v1/grade", files={"file": (name or photo.name, photo.read_bytes(), "image/jpeg")})


def _stored(data: Path) -> int:
    with ResultStore(data) as store:      # a second connection, as another process would open it
        return store.count()


def _metric(text: str, line_prefix: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_prefix + " ")]
    return values[0] if values else 0.0


def test_a_graded_photo_is_the_grade_json_record_plus_id_and_links(server, client, onnx_bundle, photos):
    from edgeretina.runtime import Grader

    photo = photos[0]
    answer = _grade(client, photo, "left eye.jpg")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    expected = Grader(onnx_bundle, threads=1).grade([photo])[0].to_dict()
    assert set(RECORD_FIELDS) <= set(body) and set(expected) == set(RECORD_FIELDS)
    for field in ("gradable", "grade", "grade_name", "referable", "screening", "knn_grade", "quality"):
        assert body[field] == expected[field], field
    assert np.allclose(body["probabilities"], expected["probabilities"], atol=1e-5)
    assert [n["case_id"] for n in body["neighbors"]] == [n["case_id"] for n in expected["neighbors"]]
    assert body["file"] == body["file_name"] == "left eye.jpg"
    assert re.fullmatch(r"[0-9a-f]{32}", body["id"]) and body["origin"] == "serve" and len(body["bundle_sha256"]) == 64
    base = f"/v1/results/{body['id']}"
    assert body["links"] == {"self": base, "overlay": f"{base}/overlay.png", "card": f"{base}/card.png"}
    assert body["overlay"] == body["links"]["overlay"]
    # committed before the answer: the row and its files are there the moment the response is
    stored = client.get(base)
    assert stored.status_code == 200 and stored.json() == body
    for link in ("overlay", "card"):
        picture = client.get(body["links"][link])
        assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
        assert picture.content[:8] == PNG
        decoded = cv2.imdecode(np.frombuffer(picture.content, np.uint8), cv2.IMREAD_COLOR)
        assert decoded is not None and decoded.shape[0] > 100
    files = server.config.data / "files" / body["id"]
    assert sorted(p.name for p in files.iterdir()) == ["card.png", "overlay.png"]
    assert client.get("/v1/results/" + "0" * 32).status_code == 404
    assert client.get("/v1/results/" + "0" * 32 + "/card.png").status_code == 404


def test_a_raw_body_is_graded_and_a_client_name_never_names_a_file(server, client, photos):
    answer = client.post("/v1/grade", params={"filename": "../../escape me.jpg"}, content=photos[1].read_bytes(),
                         headers={"content-type": "text/plain"})   # the type comes from the bytes
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["file_name"] == "../../escape me.jpg" and body["screening"] in ("negative", "referable", "ungradable")
    assert not list(server.config.data.parent.rglob("*escape*"))
    assert list(server.config.staging.iterdir()) == []        # the upload is gone once it is stored
    unnamed = client.post("/v1/grade", content=photos[2].read_bytes())
    assert unnamed.status_code == 200 and unnamed.json()["file_name"] == "upload"


def test_a_dicom_upload_is_graded_frame_by_frame(client, photos):
    dicom = pytest.importorskip("edgeretina.phantom.dicom_files")
    pytest.importorskip("pydicom")
    frames = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in photos[:2]]
    data = dicom.to_bytes(dicom.image_dataset(frames))
    answer = client.post("/v1/grade", content=data, params={"filename": "scan"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["dicom"]["frame"] == 1 and body["dicom"]["frames"] == 2
    assert [f["frame"] for f in body["frames"]] == [1, 2]
    second = client.get(body["frames"][1]["links"]["self"]).json()
    assert second["dicom"]["frame"] == 2 and second["file_name"] == "scan"


def test_an_ungradable_photo_is_stored_with_its_card_and_no_overlay(client):
    dark = cv2.imencode(".png", np.full((256, 256, 3), 6, np.uint8))[1].tobytes()    # a PNG, nothing to see
    answer = client.post("/v1/grade", content=dark, params={"filename": "dark.png"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["screening"] == "ungradable" and body["gradable"] is False and body["grade"] is None
    assert body["quality"]["reasons"]
    assert body["overlay"] is None and set(body["links"]) == {"self", "card"}
    assert client.get(body["links"]["self"] + "/overlay.png").status_code == 404
    assert client.get(body["links"]["card"]).content[:8] == PNG


def test_a_result_that_cannot_be_stored_is_not_answered_as_graded(server, client, photos):
    files = server.config.data / "files"
    files.rename(files.with_name("files.moved"))
    files.write_text("a file where the pictures' folder should be")     # the copy into the store fails
    try:
        answer = client.post("/v1/grade", content=photos[0].read_bytes())
    finally:
        files.unlink()
        files.with_name("files.moved").rename(files)
    assert answer.status_code == 500 and "could not be stored" in answer.json()["detail"]
    assert client.post("/v1/grade", content=photos[0].read_bytes()).status_code == 200


def test_history_is_newest_first_and_filters(client, photos):
    posted = [_grade(client, photo).json() for photo in photos[3:7]]
    history = client.get("/v1/results", params={"limit": 4}).json()
    assert [r["id"] for r in history["results"]] == [p["id"] for p in reversed(posted)]
    assert history["count"] == 4
    since = client.get("/v1/results", params={"since": posted[2]["created"]}).json()["results"]
    assert [r["id"] for r in since] == [posted[3]["id"], posted[2]["id"]]
    everything = client.get("/v1/results", params={"limit": 1000}).json()["results"]
    for screening in ("negative", "referable", "ungradable"):
        rows = client.get("/v1/results", params={"screening": screening, "limit": 1000}).json()["results"]
        assert [r["id"] for r in rows] == [r["id"] for r in everything if r["screening"] == screening]
    assert len({r["screening"] for r in everything}) >= 1
    assert client.get("/v1/results", params={"limit": 1}).json()["count"] == 1
    assert client.get("/v1/results", params={"screening": "maybe"}).status_code == 422
    assert client.get("/v1/results", params={"since": "last week"}).status_code == 422
    assert client.get("/v1/results", params={"limit": 0}).status_code == 422


def test_probes_and_metrics_count_what_happened(client, photos):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True and ready.json()["verified"]["cpu_class"]
    before = client.get("/metrics")
    assert before.headers["content-type"].startswith("text/plain; version=0.0.4")
    for name in ("edgeretina_http_requests_total", "edgeretina_http_request_duration_seconds",
                 "edgeretina_grade_outcomes_total", "edgeretina_queue_depth", "edgeretina_queue_capacity",
                 "edgeretina_queue_rejected_total", "edgeretina_batch_size"):
        assert f"# TYPE {name} " in before.text, name
    graded = _grade(client, photos[0]).json()
    after = client.get("/metrics").text
    requests = 'edgeretina_http_requests_total{route="/v1/grade",method="POST",status="200"}'
    outcome = f'edgeretina_grade_outcomes_total{{screening="{graded["screening"]}"}}'
    latency = 'edgeretina_http_request_duration_seconds_count{route="/v1/grade"}'
    for prefix in (requests, outcome, latency, "edgeretina_batch_size_count"):
        assert _metric(after, prefix) == _metric(before.text, prefix) + 1, prefix
    assert _metric(after, "edgeretina_queue_capacity") == 32 and _metric(after, "edgeretina_queue_depth") == 0
    assert _metric(after, "edgeretina_ready") == 1
    assert client.get("/nowhere").status_code == 404
    assert _metric(client.get("/metrics").text,
                   'edgeretina_http_requests_total{route="unmatched",method="GET",status="404"}') >= 1


def test_bad_uploads_are_refused_with_the_reason_and_not_stored(server, client, photos):
    count = _stored(server.config.data)
    empty = client.post("/v1/grade", content=b"")
    assert empty.status_code == 400 and "empty" in empty.json()["detail"]
    empty_part = client.post("/v1/grade", files={"file": ("e.jpg", b"", "image/jpeg")})
    assert empty_part.status_code == 400
    no_field = client.post("/v1/grade", files={"photo": ("e.jpg", photos[0].read_bytes(), "image/jpeg")})
    assert no_field.status_code == 400 and "`file`" in no_field.json()["detail"]
    text = client.post("/v1/grade", files={"file": ("eye.jpg", b"hello, I am text " * 20, "image/jpeg")})
    assert text.status_code == 415 and "JPEG" in text.json()["detail"]
    truncated = client.post("/v1/grade", files={"file": ("cut.jpg", photos[0].read_bytes()[:1500], "image/jpeg")})
    assert truncated.status_code == 422
    reason = truncated.json()["detail"]
    assert "truncated" in reason and "cut.jpg" in reason and str(server.config.data) not in reason
    assert _stored(server.config.data) == count
    assert _metric(client.get("/metrics").text, 'edgeretina_grade_outcomes_total{screening="error"}') >= 1
    assert list(server.config.staging.iterdir()) == []


def test_a_body_over_the_limit_is_refused_while_it_streams(server, client):
    big = b"\xff\xd8\xff" + bytes(3 * 1024 * 1024)        # 3 MB that starts like a JPEG, limit 1 MB
    declared = client.post("/v1/grade", content=big)
    assert declared.status_code == 413 and "1 MiB" in declared.json()["detail"]

    def chunks():                                          # no Content-Length: counted as it arrives
        for start in range(0, len(big), 64 * 1024):
            yield big[start:start + 64 * 1024]

    streamed = client.post("/v1/grade", content=chunks())
    assert streamed.status_code == 413
    multipart = client.post("/v1/grade", files={"file": ("big.jpg", big, "image/jpeg")})
    assert multipart.status_code == 413
    # a declared length over the limit is refused before the body is asked for: a client that waits for
    # "100 Continue" (curl does, for large bodies) never sends it
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
        raw.sendall(b"POST /v1/grade HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
                    b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(big))
        assert raw.recv(4096).startswith(b"HTTP/1.1 413 ")
    assert list(server.config.staging.iterdir()) == []
    assert client.get("/healthz").status_code == 200       # the connection pool and the server carry on


def test_no_cors_without_an_origin_and_the_openapi_page(client):
    answer = client.get("/healthz", headers={"Origin": "https://elsewhere.example"})
    assert "access-control-allow-origin" not in answer.headers
    preflight = client.options("/v1/grade", headers={"Origin": "https://elsewhere.example",
                                                     "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/grade", "/v1/results", "/v1/results/{result_id}", "/readyz"} <= set(paths)
    assert "multipart/form-data" in paths["/v1/grade"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "<title>" in page.text


def test_a_public_bind_needs_a_key_and_the_key_is_checked(onnx_bundle, tmp_path, photos, cli):
    with pytest.raises(ConfigError, match="API key is required"):
        _config(onnx_bundle, tmp_path / "data", host="0.0.0.0")
    code, _, err = cli("serve", "--bundle", onnx_bundle, "--host", "0.0.0.0", "--data", tmp_path / "cli-data")
    assert code == 1 and "--api-key-file" in err and not (tmp_path / "cli-data").exists()
    short = tmp_path / "short.key"
    short.write_text("abc\n")
    with pytest.raises(ConfigError, match="at least 16"):
        _config(onnx_bundle, tmp_path / "data", host="0.0.0.0", api_key_file=short)
    key_file = tmp_path / "api.key"
    key_file.write_text(KEY + "\n")
    # bound to every interface (not loopback); reached here through 127.0.0.1
    with LiveServer(_config(onnx_bundle, tmp_path / "data", host="0.0.0.0", api_key_file=key_file)) as live, \
            live.client() as c:
        photo = photos[0].read_bytes()
        assert c.post("/v1/grade", content=photo).status_code == 401
        wrong = c.post("/v1/grade", content=photo, headers={"Authorization": "Bearer " + KEY[:-1] + "X"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/results", headers={"X-API-Key": "nope"}).status_code == 401
        assert c.get("/metrics").status_code == 401
        right = c.post("/v1/grade", content=photo, headers={"Authorization": f"Bearer {KEY}"})
        assert right.status_code == 200, right.text
        listed = c.get("/v1/results", headers={"X-API-Key": KEY})
        assert listed.status_code == 200 and listed.json()["results"][0]["id"] == right.json()["id"]
        assert c.get(right.json()["links"]["card"], headers={"X-API-Key": KEY}).content[:8] == PNG
        assert c.get(right.json()["links"]["card"]).status_code == 401
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


def test_a_full_queue_answers_503_with_retry_after(onnx_bundle, tmp_path, photos):
    rgb = cv2.imread(str(photos[0]))
    big = cv2.imencode(".jpg", cv2.resize(rgb, (1600, 1600), interpolation=cv2.INTER_CUBIC))[1].tobytes()
    config = _config(onnx_bundle, tmp_path / "data", queue_size=1, workers=1, max_batch=1, max_upload_mb=32)

    async def flood(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return await asyncio.gather(*[c.post("/v1/grade", content=big) for _ in range(12)])

    with LiveServer(config) as live:
        answers = asyncio.run(flood(live.url))
        statuses = sorted(a.status_code for a in answers)
        assert set(statuses) <= {200, 503}, statuses
        assert 503 in statuses and 200 in statuses, statuses
        for refused in (a for a in answers if a.status_code == 503):
            assert int(refused.headers["retry-after"]) >= 1 and "queue is full" in refused.json()["detail"]
        with live.client() as c:
            text = c.get("/metrics").text
        assert _metric(text, "edgeretina_queue_rejected_total") == statuses.count(503)
        assert _stored(config.data) == statuses.count(200)


def test_a_request_that_times_out_is_504_and_not_stored(onnx_bundle, tmp_path, photos):
    config = _config(onnx_bundle, tmp_path / "data", timeout_s=0.001)
    with LiveServer(config) as live, live.client() as c:
        answer = c.post("/v1/grade", content=photos[0].read_bytes())
        assert answer.status_code == 504 and "--timeout-s" in answer.json()["detail"]
        time.sleep(0.3)                                     # a grade that was under way has finished by now
        assert _stored(config.data) == 0


def test_a_bundle_that_fails_to_load_keeps_the_service_alive_but_not_ready(onnx_bundle, tmp_path, photos):
    broken = tmp_path / "broken-bundle"
    shutil.copytree(onnx_bundle, broken)
    model = next(broken.glob("*.onnx"))
    model.write_bytes(model.read_bytes()[:-16] + bytes(16))   # same size, other bytes: sha256 mismatch
    with LiveServer(_config(broken, tmp_path / "data")) as live, live.client() as c:
        assert c.get("/healthz").status_code == 200
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "sha256" in ready.json()["reason"]
        refused = c.post("/v1/grade", content=photos[0].read_bytes())
        assert refused.status_code == 503 and "sha256" in refused.json()["detail"]
        assert "retry-after" not in refused.headers                  # it will not get better by waiting
        assert _metric(c.get("/metrics").text, "edgeretina_ready") == 0


def test_the_cli_registers_serve_without_importing_the_web_stack(monkeypatch):
    code = ("import sys, edgeretina.cli; edgeretina.cli._register(); "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
    from edgeretina.serve import require_extra

    monkeypatch.setitem(sys.modules, "uvicorn", None)            # import uvicorn -> ImportError
    with pytest.raises(MissingDependencyError, match=r"edgeretina\[serve\]"):
        require_extra()


def test_requests_that_arrive_together_share_one_grader_call(onnx_bundle, tmp_path, photos):
    """Micro-batching on (max_batch 8) puts concurrent requests into fewer Grader calls; max_batch 1 gives one
    call per request, with one worker or two sharing the grader. The grades do not depend on the company a
    photo is graded in."""
    uploads = [p.read_bytes() for p in photos[:6]]

    async def together(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return await asyncio.gather(*[c.post("/v1/grade", content=data) for data in uploads])

    grades, batches = {}, {}
    for max_batch, workers in ((8, 1), (1, 1), (1, 2)):
        config = _config(onnx_bundle, tmp_path / f"data{max_batch}-{workers}", max_batch=max_batch, workers=workers,
                         batch_wait_ms=200)
        with LiveServer(config) as live:
            answers = asyncio.run(together(live.url))
            assert [a.status_code for a in answers] == [200] * 6
            grades[max_batch, workers] = [(a.json()["grade"], a.json()["screening"]) for a in answers]
            with live.client() as c:
                text = c.get("/metrics").text
            batches[max_batch, workers] = (_metric(text, "edgeretina_batch_size_count"),
                                           _metric(text, "edgeretina_batch_size_sum"))
    assert batches[1, 1] == batches[1, 2] == (6, 6)
    assert batches[8, 1][1] == 6 and batches[8, 1][0] < 6
    assert grades[8, 1] == grades[1, 1] == grades[1, 2]


def test_cross_site_posts_and_rebound_host_names_are_refused(server, client, photos):
    """A page on another site (a form, fetch no-cors) must not grade into the keyless loopback service, and a
    name re-pointed at 127.0.0.1 (DNS rebinding) must not reach it at all."""
    before = _stored(server.config.data)
    for headers in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
        refused = client.post("/v1/grade", content=photos[0].read_bytes(), headers=headers)
        assert refused.status_code == 403 and "cross-site" in refused.json()["detail"], headers
    assert _stored(server.config.data) == before          # nothing graded, nothing stored
    own_page = {"Origin": server.url, "Sec-Fetch-Site": "same-origin"}
    assert client.post("/v1/grade", content=photos[0].read_bytes(), headers=own_page).status_code == 200
    assert client.get("/v1/results", headers={"Host": "evil.example"}).status_code == 400
    assert client.get("/healthz", headers={"Host": f"localhost:{server.port}"}).status_code == 200


def test_cors_origins_are_checked():
    from edgeretina.errors import ConfigError

    for bad in ("*", "clinic.example"):
        with pytest.raises(ConfigError, match="cors-origin"):
            _config(Path(__file__), Path("/tmp/unused"), cors_origins=(bad,))


def test_options_cors_when_asked_and_no_readiness_without_verification(onnx_bundle, tmp_path, photos):
    origin = "https://clinic.example"
    config = _config(onnx_bundle, tmp_path / "data", cors_origins=(origin,), verify="off")
    with LiveServer(config) as live, live.client() as c:
        assert c.get("/healthz", headers={"Origin": origin}).headers["access-control-allow-origin"] == origin
        assert "access-control-allow-origin" not in c.get("/healthz", headers={"Origin": "https://x.example"}).headers
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["state"] == "unverified"
        assert c.post("/v1/grade", content=photos[0].read_bytes()).status_code == 200   # grading still works


class TestBatchingQueue:
    """The queue alone, with a process function the test controls (threading.Event holds a worker)."""

    def _queue(self, process, **options):
        from edgeretina.serve.queue import BatchingQueue

        queue = BatchingQueue(process, **{"capacity": 4, "workers": 1, **options})
        queue.start()
        return queue

    def test_jobs_are_batched_and_answered_in_order(self):
        seen = []

        def double(batch):
            seen.append(list(batch))
            return [x * 2 for x in batch]

        gate = threading.Event()
        first = self._queue(lambda b: (gate.wait(5), double(b))[1], capacity=8, max_batch=3, batch_wait_s=0.5)
        futures = [first.submit(i) for i in range(5)]
        gate.set()
        assert [f.result(5) for f in futures] == [0, 2, 4, 6, 8]
        assert [len(b) for b in seen] == [3, 2] and sum(seen, []) == list(range(5))
        first.close()

    def test_a_full_queue_refuses_at_once_and_a_cancelled_job_is_never_graded(self):
        from edgeretina.serve.queue import QueueClosed, QueueFull

        gate, graded = threading.Event(), []
        queue = self._queue(lambda b: (gate.wait(5), graded.extend(b), b)[2], capacity=2)
        running = queue.submit("running")
        deadline = time.monotonic() + 5
        while queue.depth and time.monotonic() < deadline:     # the worker has taken it
            time.sleep(0.001)
        waiting, cancelled = queue.submit("waiting"), queue.submit("cancelled")
        with pytest.raises(QueueFull) as full:
            queue.submit("one too many")
        assert full.value.retry_after_s >= 1 and queue.depth == 2
        assert queue.cancel(cancelled) and queue.depth == 1
        assert not queue.cancel(running)                        # being graded: too late to take back
        gate.set()
        assert running.result(5) == "running" and waiting.result(5) == "waiting"
        assert graded == ["running", "waiting"]
        queue.close()
        with pytest.raises(QueueClosed):
            queue.submit("after close")

    def test_a_failing_batch_fails_its_jobs_and_the_worker_goes_on(self):
        def process(batch):
            if "bad" in batch:
                raise RuntimeError("grader broke")
            return batch

        queue = self._queue(process)
        with pytest.raises(RuntimeError, match="grader broke"):
            queue.submit("bad").result(5)
        assert queue.submit("good").result(5) == "good"
        queue.close()

    def test_close_fails_the_waiting_jobs(self):
        from edgeretina.serve.queue import QueueClosed

        gate = threading.Event()
        queue = self._queue(lambda b: (gate.wait(5), b)[1])
        running = queue.submit(1)
        while queue.depth:
            time.sleep(0.001)
        waiting = queue.submit(2)
        closer = threading.Thread(target=queue.close)
        closer.start()
        with pytest.raises(QueueClosed):
            waiting.result(5)
        gate.set()
        closer.join(5)
        assert running.result(5) == 1


def test_a_file_whose_grading_raises_fails_alone_not_its_batch(onnx_bundle, phantom_test, tmp_path):
    """Fault injection: the grader raises (as a decoder's own exception would) whenever the batch holds
    the bad file; the service regrades file by file and only that file becomes an error record."""
    from edgeretina.dataset import read_labels
    from edgeretina.serve.service import GradingService

    service = GradingService(_config(onnx_bundle, tmp_path / "data", max_batch=4))
    service.start()
    try:
        assert service.wait_loaded(120) and service.state == "ready"
        good = [str(item.path) for item in read_labels(phantom_test)[:2]]
        bad = tmp_path / "bad.png"
        bad.write_bytes(Path(good[0]).read_bytes())
        real = service.grader.grade_iter

        def raising(files, **kwargs):
            if str(bad) in files:
                raise ValueError("decoder exploded")
            return real(files, **kwargs)

        service.grader.grade_iter = raising
        groups = service._grade_batch([Path(good[0]), bad, Path(good[1])])
        assert [len(g) for g in groups] == [1, 1, 1]
        assert groups[0][0].record.screening is not None and groups[2][0].record.screening is not None
        failed = groups[1][0].record
        assert failed.screening is None and "ValueError: decoder exploded" in failed.error
    finally:
        service.close()
