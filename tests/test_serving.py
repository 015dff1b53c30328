"""Serving: request checks, and a real server process on the trained golden reverse model, under
concurrent load with bad requests mixed in, a full queue, a client that goes away and SIGTERM
while requests are in flight. Every good request gets decode's answer."""

import concurrent.futures
import dataclasses
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest

from tests.conftest import FAST_COMPILE_XLA_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "reverse_workdir")


class FakeEngine:
    name, beam_sizes, max_batch, max_source_length = "fake", (1, 4), 8, 10


@pytest.mark.parametrize("body, status, message", [
    ([], 400, "the body must be a JSON object"),
    ({"txt": ["1"]}, 400, "unknown field 'txt'; the fields are text, beam_size"),
    ({"beam_size": 4}, 400, "'text' is required"),
    ({"text": "1 2"}, 400, "'text' must be a list of strings"),
    ({"text": []}, 400, "'text' is empty"),
    ({"text": ["1"] * 5}, 413, "5 sentences in one request, over this server's "
                               "--max_request_sentences 4; split it"),
    ({"text": ["1"], "beam_size": 3}, 400, "beam_size 3 is not served; this server compiled "
                                           "1, 4 (--beam_sizes)"),
    ({"text": ["1"], "beam_size": "4"}, 400, "'beam_size' must be an integer, got \"4\""),
    ({"text": ["1"], "alpha": True}, 400, "'alpha' must be a number, got true"),
    ({"text": ["1"], "alpha": -1}, 400, "'alpha' must be a finite number at least 0"),
    ({"text": ["1"], "beam_size": 1, "nbest": 2}, 400, "nbest 2 needs 1 <= nbest <= beam_size"),
    ({"text": ["1", "2"], "target_prefix": [""]}, 400, "'target_prefix' has 1 entries and "
                                                      "'text' 2"),
])
def test_a_bad_request_is_a_4xx_naming_the_fix(body, status, message):
    from t2t_jax.serving.server import BadRequest, ServerSettings, parse_request

    with pytest.raises(BadRequest) as caught:
        parse_request(body, FakeEngine(), ServerSettings(max_request_sentences=4))
    assert caught.value.status == status and message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_loadtest_sends_load_only_to_this_machine():
    from t2t_jax.serving.loadtest import check_loopback

    assert check_loopback("http://127.0.0.1:8080/") == "http://127.0.0.1:8080"
    assert check_loopback("http://localhost:1") == "http://localhost:1"
    assert check_loopback("http://[::1]:1") == "http://[::1]:1"
    with pytest.raises(ValueError, match="not a loopback address"):
        check_loopback("http://10.0.0.1:8080")
    with pytest.raises(ValueError, match="not a loopback address"):
        check_loopback("http://example.com")


def post(port, body, timeout=120):
    """(status, JSON answer, headers) of POST /v1/translate; body: an object, or raw bytes."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/translate", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), error.headers


def get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


@pytest.fixture(scope="module", params=["jax", "ctranslate2"])
def server(request, tmp_path_factory):
    """The golden reverse model served greedy and at beam 2, batches of up to 4, each
    sentence waiting up to 400 ms for company, at most 6 waiting, inputs cut to 16 tokens (one
    length bucket to compile), by our decoding path or by CTranslate2 on its export:
    (process, port)."""
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE_XLA_FLAGS)
    model = ["--workdir", GOLDEN]
    if request.param == "ctranslate2":
        pytest.importorskip("ctranslate2")
        from t2t_jax.export.ctranslate2_spec import export_ctranslate2

        decoder = golden_decoder()
        export = str(tmp_path_factory.mktemp("export") / "ct2")
        export_ctranslate2(decoder.model.config, jax.device_get(decoder.params[0]),
                           decoder.tokenizer, export,
                           {"max_source_length": decoder.max_source_length})
        model = ["--engine", "ctranslate2", "--export_dir", export]
    process = subprocess.Popen(
        [sys.executable, "-m", "t2t_jax.cli", "serve", *model, "--port", "0",
         "--beam_sizes", "1,2", "--max_batch", "4", "--max_wait_ms", "400", "--max_queue", "6",
         "--max_request_sentences", "6", "--max_source_length", "16"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []  # read all along: a full pipe would stall the server
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 240
    while not (found := re.search(r"listening on http://127.0.0.1:(\d+)", "".join(output))):
        assert process.poll() is None and time.time() < deadline, "".join(output)
        time.sleep(0.1)
    port = int(found.group(1))
    status, _ = get(port, "/health")
    assert status in (200, 503)  # it answers while it compiles
    while get(port, "/health")[0] != 200:
        assert process.poll() is None and time.time() < deadline, "".join(output)
        time.sleep(0.5)
    process.output = output
    yield process, port
    print("".join(output))
    if process.poll() is None:
        process.kill()
    process.wait()


@functools.cache
def golden_decoder(max_source_length=None):
    from t2t_jax.decode import load_decoder

    decoder = load_decoder(GOLDEN)
    if max_source_length:
        decoder = dataclasses.replace(decoder, max_source_length=max_source_length)
    return decoder


def expected_answers(texts, beam_size, nbest=1, prefixes=None):
    """decode's hypotheses for `texts`, in-process, with the server's settings."""
    from t2t_jax.decode import DecodeOptions, Search, translate

    decoder = golden_decoder(16)  # as the server cuts inputs
    search = Search(beam_size, 0.6, nbest)
    return translate(decoder, texts, DecodeOptions(search), prefixes=prefixes)[0]


def assert_same(answer, hypotheses):
    assert answer["text"] == hypotheses[0].text
    np.testing.assert_allclose(answer["log_prob"], hypotheses[0].log_prob, atol=1e-4)
    np.testing.assert_allclose(answer["score"], hypotheses[0].score, atol=1e-4)
    assert answer["tokens"] == len(hypotheses[0].ids) + 1


SOURCES = ["3 1 4", "1 2 3 4 5", "9 8 7 6 5 4 3 2 1 0 1 2", "5", "2 7 1 8 2 8", ""]


@pytest.mark.xdist_group("server")
def test_served_translations_equal_decodes_under_concurrent_load(server):
    process, port = server
    greedy, beam = expected_answers(SOURCES, 1), expected_answers(SOURCES, 2, nbest=2)
    bad = [b"{not json", {"text": []}, {"text": ["1"], "beam_size": 5},
           {"text": ["1 x 2"]}, {"text": [1, 2]}]

    def good(n):
        text = SOURCES[n % len(SOURCES)]
        if n % 2:
            return post(port, {"text": [text], "beam_size": 2, "nbest": 2}), n
        return post(port, {"text": [text], "beam_size": 1}), n

    # Six clients at once: the queue (6) holds them all.
    with concurrent.futures.ThreadPoolExecutor(6) as pool, \
            concurrent.futures.ThreadPoolExecutor(2) as bad_pool:
        goods = [pool.submit(good, n) for n in range(24)]
        bads = [bad_pool.submit(post, port, body) for body in bad]
        for future in goods:
            (status, answer, _), n = future.result()
            assert status == 200, answer
            (entry,) = answer["translations"]
            expected = (beam if n % 2 else greedy)[n % len(SOURCES)]
            assert_same(entry, expected)
            if n % 2:
                assert [h["text"] for h in entry["nbest"]] == [h.text for h in expected]
            assert entry["warnings"] == []
        statuses = [f.result()[0] for f in bads]
        messages = [f.result()[1]["error"] for f in bads]
    assert statuses == [400, 400, 400, 400, 400]
    assert "the body is not JSON" in messages[0]
    assert messages[3] == ("text line 1: symbol 'x' is not in the model's vocabulary "
                           "(0 1 2 3 4 5 6 7 8 9)")
    # Sentences of concurrent requests were searched together.
    metrics = get(port, "/metrics")[1]
    size_sum = float(re.search(r"^t2t_batch_size_sum (\S+)", metrics, re.M).group(1))
    batches = float(re.search(r"^t2t_batch_size_count (\S+)", metrics, re.M).group(1))
    assert size_sum == 24 and batches < 24
    # Our engine took greedy sentences into continuous batches once six clients loaded it.
    continuous = float(re.search(r"^t2t_continuous_sentences_total (\S+)", metrics, re.M)[1])
    assert (continuous > 0) == ("ctranslate2" not in process.args) and continuous <= 12
    assert re.search(r'^t2t_requests_total\{status="400"\} 5.0', metrics, re.M)
    assert "t2t_queue_depth" in metrics and "t2t_request_latency_seconds_bucket" in metrics


@pytest.mark.xdist_group("server")
def test_one_request_with_prefixes_long_lines_and_its_own_order(server):
    _, port = server
    long_line = " ".join(["7"] * 20)  # over the server's 16 source tokens
    texts = ["1 2 3 4 5", long_line, "3 1 4"]
    status, answer, _ = post(port, {"text": texts, "beam_size": 2,
                                    "target_prefix": ["5 4", "", "9"]})
    assert status == 200, answer
    expected = expected_answers(texts, 2, prefixes=["5 4", "", "9"])
    for entry, hypotheses in zip(answer["translations"], expected, strict=True):
        assert_same(entry, hypotheses)
    first, cut, forced = answer["translations"]
    assert first["text"] == "5 4 3 2 1" and forced["text"].startswith("9")
    assert cut["warnings"] == ["the input is over 16 tokens and was cut to them"]


@pytest.mark.xdist_group("server")
def test_a_full_queue_is_a_503_with_retry_after_and_a_lost_client_harms_no_one(server):
    _, port = server
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        # Three sentences wait 400 ms for a fourth to fill their batch (beam 2: greedy ones
        # take a free slot at once): four more do not fit into the queue of six.
        filling = pool.submit(post, port, {"text": SOURCES[:3], "beam_size": 2})
        time.sleep(0.15)
        status, answer, headers = post(port, {"text": SOURCES[:4], "beam_size": 2})
        assert status == 503 and "retry after" in answer["error"]
        assert int(headers["Retry-After"]) >= 1
        assert filling.result()[0] == 200
    # A client that sends its request and goes away before the answer ...
    body = json.dumps({"text": ["5 9 2"], "beam_size": 2}).encode()
    with socket.create_connection(("127.0.0.1", port)) as lost:
        lost.sendall(b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/"
                     b"json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        # ... while another request, in the same batch, is answered.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            other = pool.submit(post, port, {"text": ["3 1 4"], "beam_size": 2})
            time.sleep(0.05)
            lost.close()
            status, answer, _ = other.result()
    assert status == 200 and answer["translations"][0]["text"] == "4 1 3"
    assert get(port, "/health")[0] == 200


@pytest.mark.xdist_group("server")
def test_sigterm_answers_the_requests_in_flight_and_exits_0(server):
    process, port = server
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        in_flight = [pool.submit(post, port, {"text": [text], "beam_size": 2})
                     for text in SOURCES[:4]]
        time.sleep(0.1)  # queued, waiting for the batch to fill
        process.send_signal(signal.SIGTERM)
        answers = [f.result() for f in in_flight]
    assert [a[0] for a in answers] == [200] * 4
    expected = expected_answers(SOURCES[:4], 2)
    for (_, answer, _), hypotheses in zip(answers, expected, strict=True):
        assert_same(answer["translations"][0], hypotheses)
    assert process.wait(timeout=60) == 0
    time.sleep(0.2)
    assert "t2t-jax serve: stopped" in "".join(process.output)


def test_continuous_greedy_equals_greedy_decoding_as_slots_refill():
    """Seven sentences through two slots, each refilled when its sentence ends: the texts,
    tokens and log-probs of greedy decoding, target prefixes, an empty line and the length
    limit included (a prefix of two makes the longest output run into its limit of 16 tokens,
    extra_length 0)."""
    from t2t_jax.decode import DecodeOptions, Hypothesis, Search, translate_encoded
    from t2t_jax.serving.continuous import ContinuousGreedy, SlotScheduler
    from t2t_jax.serving.engine import JaxEngine

    decoder = golden_decoder(16)
    texts = ["3 1 4", "9 8 7 6 5 4 3 2 1 0 1 2 3 4 5", "5", "1 2 3 4 5", "2 7 1 8", "", ""]
    prefixes = ["", "6 6", "", "5 4", "", "7", ""]
    sentences = JaxEngine(decoder, [1], 2, extra_length=0).encode(texts, prefixes)
    expected, _ = translate_encoded(
        decoder, [list(s.ids) for s in sentences], DecodeOptions(Search(1, 0.0), extra_length=0),
        prefixes=[list(s.prefix) for s in sentences])
    scheduler = SlotScheduler(ContinuousGreedy(decoder, 2, 16, extra_length=0), idle_steps=3)
    scheduler.start()
    answers = [concurrent.futures.Future() for _ in sentences]
    for sentence, answer in zip(sentences, answers, strict=True):
        scheduler.submit(sentence, answer.set_result)
    for answer, hypotheses in zip(answers, expected, strict=True):
        (found,) = answer.result(timeout=120)
        assert (found.text, found.ids) == (hypotheses[0].text, hypotheses[0].ids)
        np.testing.assert_allclose(found.log_prob, hypotheses[0].log_prob, atol=1e-4)
        np.testing.assert_allclose(found.score, hypotheses[0].score, atol=1e-4)
    assert scheduler.pending == 0
    scheduler.stop()
    assert len(expected[1][0].ids) == 16 and 1 not in expected[1][0].ids  # ran to its limit
    assert expected[0][0].text == "4 1 3" and expected[6] == [Hypothesis([], 0.0, 0.0, "")]
