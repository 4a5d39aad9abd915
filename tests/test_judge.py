"""The LLM judge against a fake OpenAI-compatible server on 127.0.0.1 (nothing here reaches the network): sampling
settings, retries on 429 / 5xx / time-outs / bad answers, per-item failures, the SQLite cache, tolerant parsing,
the 7-seed median protocol, and the caption clean-up and repetition rate."""
import json
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from config import UserError
from judge import (JUDGE_MODEL, SEED, JudgeError, LLMJudge, ToyJudge, median_of_runs, parse_events, parse_judgment, rates,
                   reduce_repeated_words, repetition_rate, toy_judge)

EVENTS = ["A red circle appears.", "A tone plays.", "A man says hello."]
TIMEOUT = 5.0  # seconds a client waits for an answer: generous, so that a busy machine does not fail a test
SHORT_TIMEOUT = 0.5  # ... and in the time-out test, where a fault sleeps longer than this
SLOW = 1.0  # seconds the time-out fault sleeps
RETRY_AFTER = 0.3  # seconds the rate-limit fault asks the client to wait


def answer_text(missed=0, incorrect=0, hallucinated=0, **lists):
    return json.dumps({"Missed": missed, "Incorrect": incorrect, "Hallucination": hallucinated,
                       "Missed Event": lists.get("m", []), "Incorrect Event": lists.get("i", []),
                       "Hallucination Event": lists.get("h", [])})


def caption_of(body):
    """The caption a judge request rates (the released user prompt puts it under this heading)."""
    user = body["messages"][-1]["content"]
    return user.split("#### Video Description To Be Rated\n")[1].split("\n\nGiven base events")[0]


class Handler(BaseHTTPRequestHandler):
    """POST /v1/chat/completions: records the request, plays the next queued fault if any (to requests that
    server.faulty(request body) picks), else answers with server.answer(request body). Faults: ("status", code,
    headers), ("sleep", seconds), ("raw", content type, body bytes): status 200 with a body that is no completion."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.requests.append(body)
            fault = srv.faults.pop(0) if srv.faults and srv.faulty(body) else None
        if self.path != "/v1/chat/completions":
            return self.reply(404, {"error": {"message": "no such route"}})
        if fault and fault[0] == "status":
            return self.reply(fault[1], {"error": {"message": f"fault {fault[1]}", "type": "fault"}}, fault[2])
        if fault and fault[0] == "raw":
            return self.send_raw(fault[1], fault[2])
        if fault and fault[0] == "sleep":
            time.sleep(fault[1])  # the client has given up by now; the late answer below goes nowhere
        completion = {"id": "cmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
                      "choices": [{"index": 0, "finish_reason": "stop",
                                   "message": {"role": "assistant", "content": srv.answer(body)}}]}
        self.reply(200, completion)

    def reply(self, status, payload, headers=None):
        self.send_raw("application/json", json.dumps(payload).encode(), status, headers)

    def send_raw(self, content_type, data, status=200, headers=None):
        try:
            self.send_response(status)
            for k, v in {"Content-Type": content_type, "Content-Length": str(len(data)), **(headers or {})}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client timed out and closed the connection
            pass


@pytest.fixture
def server(monkeypatch):
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads, srv.block_on_close = True, False
    srv.lock, srv.requests, srv.faults = threading.Lock(), [], []
    srv.answer = lambda body: answer_text()
    srv.faulty = lambda body: True
    srv.handle_error = lambda request, address: None  # a client that hung up is no test failure
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


@pytest.fixture
def make_client(server, tmp_path):
    clients = []

    def make(**kw):
        client = LLMJudge(model=kw.pop("model", "test-judge"), base_url=f"http://127.0.0.1:{server.server_port}/v1",
                             api_key="test", cache_path=str(tmp_path / "judge_cache.sqlite"), base_delay=0.01,
                             timeout=kw.pop("timeout", TIMEOUT), **kw)
        clients.append(client)
        return client
    yield make
    for c in clients:
        c.close()


def test_judge_sends_released_settings_and_prompt(server, make_client):
    server.answer = lambda body: answer_text(1, 0, 2, m=[EVENTS[1]], h=["A dog barks.", "It rains."])
    out = make_client().judge("A red circle appears and a man says hello.", EVENTS)
    assert out == {"events": 3, "missed": 1, "incorrect": 0, "hallucinated": 2, "missed_events": [EVENTS[1]],
                   "incorrect_events": [], "hallucinated_events": ["A dog barks.", "It rains."]}
    (body,) = server.requests
    assert (body["model"], body["temperature"], body["top_p"], body["seed"]) == ("test-judge", 0.0, 0.1, SEED)
    assert "There are totally 3 base events" in body["messages"][0]["content"]
    assert str(EVENTS) in body["messages"][1]["content"]
    assert caption_of(body) == "A red circle appears and a man says hello."
    assert JUDGE_MODEL == "gpt-3.5-turbo-0125" and SEED == 2024


def test_retries_rate_limit_server_error_and_timeout(server, make_client):
    server.faults = [("status", 429, {"Retry-After": str(RETRY_AFTER)}), ("status", 500, {}), ("sleep", SLOW)]
    server.answer = lambda body: answer_text(0, 1, 0, i=[EVENTS[0]])
    start = time.time()
    out = make_client(timeout=SHORT_TIMEOUT).judge("caption", EVENTS)
    assert (out["missed"], out["incorrect"], out["hallucinated"]) == (0, 1, 0)
    assert len(server.requests) == 4
    assert [b["seed"] for b in server.requests] == [SEED] * 4  # no answer came back: the same request again
    assert RETRY_AFTER + SHORT_TIMEOUT <= time.time() - start < 5  # Retry-After was honoured


def test_gives_up_after_server_errors_with_one_line(server, make_client):
    server.faults = [("status", 503, {})] * 3
    with pytest.raises(JudgeError) as e:
        make_client(max_attempts=3).judge("caption", EVENTS, name="item 9")
    assert str(e.value).startswith("item 9: no answer from the judge after 3 attempts: InternalServerError")
    assert "\n" not in str(e.value) and len(server.requests) == 3


def test_a_reply_that_is_no_chat_completion_is_retried_then_fails_its_item(server, make_client):
    """HTTP 200 with a body that is not a chat completion (a proxy's HTML page, said to be JSON or not) is a server
    failure: retried at the same seed, and after max_attempts a JudgeError naming the item, never a crash."""
    page = b"<html><body>502 Bad Gateway</body></html>"
    server.faults = [("raw", "application/json", page), ("raw", "text/html", page)]
    server.answer = lambda body: answer_text(1, 0, 0)
    out = make_client().judge("caption", EVENTS)
    assert out["missed"] == 1 and [b["seed"] for b in server.requests] == [SEED] * 3
    server.faults = [("raw", "text/html", page)] * 2
    with pytest.raises(JudgeError) as e:
        make_client(max_attempts=2).judge("another caption", EVENTS, name="item 7")
    assert str(e.value).startswith("item 7: no answer from the judge after 2 attempts: NotACompletion")
    assert "\n" not in str(e.value)


def test_unparseable_and_inconsistent_answers_are_reasked_with_the_next_seed(server, make_client):
    bad = {SEED: "Sorry, I cannot rate this description.", SEED + 1: answer_text(2, 2, 0)}  # 2 + 2 > 3 events
    server.answer = lambda body: bad.get(body["seed"], answer_text(1, 1, 1))
    out = make_client().judge("caption", EVENTS)
    assert (out["missed"], out["incorrect"], out["hallucinated"]) == (1, 1, 1)
    assert [b["seed"] for b in server.requests] == [SEED, SEED + 1, SEED + 2]


def test_judge_all_keeps_the_good_items_and_the_cache_answers_a_second_run(server, make_client, tmp_path):
    items = [{"id": f"clip-{k}", "caption": f"caption {k}", "events": EVENTS} for k in range(6)]
    items[3]["caption"] = "BROKEN"

    def answer(body):
        if caption_of(body) == "BROKEN":
            return "{'Missed': 'many'"
        return answer_text(int(caption_of(body).split()[-1]) % 3)
    server.answer = answer
    server.faults = [("status", 429, {}), ("status", 502, {})]
    server.faulty = lambda body: caption_of(body) != "BROKEN"  # so that the broken item gets all its 3 tries
    results, errors = make_client(max_attempts=3).judge_all(items, workers=4)
    assert [r["id"] for r in results] == ["clip-0", "clip-1", "clip-2", "clip-4", "clip-5"]
    assert [r["missed"] for r in results] == [0, 1, 2, 1, 2]
    (message,) = errors.values()
    assert list(errors) == ["clip-3"] and "\n" not in message
    assert message.startswith("item clip-3: judge answer did not parse after 3 attempts: ")
    first = len(server.requests)
    assert first == 5 + 3 + 2  # five good items, three tries of the broken one, two faults

    # a new client on the same file: every good item comes from the cache, no call made
    server.requests.clear()
    again, _ = make_client(max_attempts=3).judge_all([it for it in items if it["caption"] != "BROKEN"], workers=2)
    assert again == results and server.requests == []

    # the broken item's cached bad answers are skipped for free: with the judge fixed it succeeds at a fresh seed
    server.answer = lambda body: answer_text(3)
    (fixed,), errors = make_client(max_attempts=3).judge_all([items[3]])
    assert errors == {} and fixed["missed"] == 3
    assert [b["seed"] for b in server.requests] == [SEED + 3]

    rows = sqlite3.connect(str(tmp_path / "judge_cache.sqlite")).execute("SELECT request, answer FROM answers").fetchall()
    assert len(rows) == 5 + 3 + 1
    request = json.loads(rows[0][0])
    assert sorted(request) == ["messages", "model", "seed", "temperature", "top_p"]


def test_a_rejected_request_fails_its_item(server, make_client):
    server.faults = [("status", 400, {})]
    results, errors = make_client().judge_all([{"caption": "too long", "events": EVENTS}], workers=1)
    assert results == [] and errors[0].startswith("item 0: the judge rejected the request: ")
    assert len(server.requests) == 1  # not retried


@pytest.mark.parametrize("status", [401, 404])
def test_a_wrong_key_or_model_stops_the_batch_with_one_line(server, make_client, status):
    """A rejected key (401) or an unknown model or route (404) would fail every item the same way: a UserError naming
    the model and the server, which the entry points print as one line, not an openai exception's traceback."""
    server.faults = [("status", status, {})]
    with pytest.raises(UserError) as e:
        make_client().judge_all([{"caption": "caption", "events": EVENTS}], workers=1)
    assert str(e.value).startswith(f"test-judge at http://127.0.0.1:{server.server_port}/v1/: the server refused the "
                                   "request (") and f"fault {status}" in str(e.value)
    assert "\n" not in str(e.value) and len(server.requests) == 1


def test_no_key_and_no_server_is_one_line(monkeypatch, tmp_path):
    for var in ("OPENAI_API_KEY", "OPENAI_ADMIN_KEY", "OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(UserError, match="test-judge: no API key: set OPENAI_API_KEY, or OPENAI_BASE_URL"):
        LLMJudge("test-judge", cache_path=str(tmp_path / "judge_cache.sqlite"))


def test_truncated_caption_is_cleaned_before_judging(server, make_client):
    make_client().judge("A tone plays. " * 8, EVENTS, truncated=True)
    assert caption_of(server.requests[0]) == "A tone plays. "


def test_decompose(server, make_client):
    events = ["The video begins with a whale shark swimming in the ocean.", "Background music can be heard."]
    answers = {SEED: '{"events": "none"}', SEED + 1: "Here they are:\n```json\n" + json.dumps(events) + "\n```"}
    server.answer = lambda body: answers[body["seed"]]
    assert make_client().decompose("A whale shark swims while music plays.") == events
    assert "A whale shark swims while music plays." in server.requests[0]["messages"][-1]["content"]
    assert "JSON list" in server.requests[0]["messages"][0]["content"]


def test_median_of_runs_reports_the_run_with_the_median_total(server, make_client):
    missed = dict(zip(range(SEED, SEED + 7), [5, 1, 3, 0, 4, 2, 6]))
    server.answer = lambda body: answer_text(missed[body["seed"]])
    items = [{"id": k, "caption": f"caption {k}", "events": [f"event {e}" for e in range(10)]} for k in range(2)]
    out = median_of_runs(make_client(), items, workers=2)
    assert out["seed"] == SEED + 2 and out["total"] == pytest.approx(0.3) and out["errors"] == {}
    assert [r["seed"] for r in out["runs"]] == list(range(SEED, SEED + 7))
    assert [r["total"] for r in out["runs"]] == pytest.approx([m / 10 for m in missed.values()])
    assert sorted(b["seed"] for b in server.requests) == sorted(list(range(SEED, SEED + 7)) * 2)


@pytest.mark.parametrize("text", [
    '{"Missed": 1, "Incorrect": 0, "Hallucination": 2, "Missed Event": ["a"], "Incorrect Event": [], "Hallucination Event": ["x", "y"]}',
    'Sure!\n```json\n{"Missed": 1, "Incorrect": 0, "Hallucination": 2, "Missed Event": ["a"], "Incorrect Event": [], '
    '"Hallucination Event": ["x", "y"]}\n```\nLet me know if {anything} else is needed.',
    "{'Missed': 1, 'Incorrect': 0, 'Hallucination': 2, 'Missed Event': ['a'], 'Incorrect Event': [], 'Hallucination Event': ['x', 'y'],}",
    '{"Missed": "1", "Incorrect": "0", "Hallucination": 2.0, "Missed Event": ["a"], "Incorrect Event": [], "Hallucination Event": ["x", "y"]}',
    '{"Missed Event": ["a"], "Incorrect Event": [], "Hallucination Event": ["x", "y"]}',
    '<think>Count them: {maybe 3}?</think>{"missed": 1, "incorrect": 0, "hallucinations": 2, "missed_events": ["a"], "hallucination_events": ["x", "y"]}',
])
def test_parse_tolerance(text):
    out = parse_judgment(text, 3)
    assert (out["missed"], out["incorrect"], out["hallucinated"]) == (1, 0, 2)
    assert out["missed_events"] == ["a"] and out["hallucinated_events"] == ["x", "y"] and out["events"] == 3


@pytest.mark.parametrize("text", [
    '{"Missed": 2, "Incorrect": 2, "Hallucination": 0}',  # 2 + 2 > 3 ground-truth events
    '{"Missed": -1, "Incorrect": 0, "Hallucination": 0}',
    '{"Missed": "two", "Incorrect": 0, "Hallucination": 0}',
    '{"Missed": true, "Incorrect": 0, "Hallucination": 0}',
    '{"Missed": 1.5, "Incorrect": 0, "Hallucination": 0}',
    '{"Missed": 1, "Incorrect": 0}',
    '{"Missed": 1, "Incorrect": 0, "Hallucination": 0, "Missed Event": "a"}',
    '["Missed", 1]',
    "The description misses one event.",
    "",
])
def test_parse_rejects(text):
    with pytest.raises(ValueError):
        parse_judgment(text, 3)


def test_parse_events():
    assert parse_events('["A tone plays.", " A man says hello. "]') == ["A tone plays.", "A man says hello."]
    assert parse_events("Events:\n```\n['A dog [brown] barks.']\n```") == ["A dog [brown] barks."]
    for bad in ("[]", "[1, 2]", '["ok", ""]', "no list"):
        with pytest.raises(ValueError):
            parse_events(bad)


def test_repetition_rate():
    assert repetition_rate("The video begins with a whale shark swimming in the ocean.") == 0.0
    assert repetition_rate("too short") == 0.0
    loop = "A woman says hello while the music plays. " * 10
    assert repetition_rate(loop) > 0.85
    assert 0 < repetition_rate("A red circle appears. A red circle appears. Then a tone plays softly.") < 0.5
    assert repetition_rate("A Red circle, appears") == repetition_rate("a red circle appears") == 0.0


def test_reduce_repeated_words():
    assert reduce_repeated_words("hahahahaha!") == "ha!"  # 5 copies of a short substring
    assert reduce_repeated_words("hahahaha!") == "hahahaha!"  # 4 are not enough
    assert reduce_repeated_words("The man says hello. " * 6 + "End.") == "The man says hello. End."
    long = "The camera slowly pans across the crowded market at sunset. "  # 61 characters
    assert reduce_repeated_words(long * 4 + "End.") == long + "End."  # 4 copies of a long one are enough
    assert reduce_repeated_words(long * 3) == long * 3
    text = "A red circle appears.\nA tone plays."
    assert reduce_repeated_words(text) == text


def test_rates_and_toy_judge_unchanged():
    j = toy_judge([["circle", "red"], ["unknown", "x"]], [["circle", "blue"], ["tone", "440"]])
    assert (j["missed"], j["incorrect"], j["hallucinated"]) == (1, 1, 1)
    assert rates([j]) == {"miss": 0.5, "hall": 1.0, "total": 1.5, "judged": 1}


def test_toy_sentence_counts_count_a_repeated_event_right_once():
    """What a toy caption states by type: a sentence said twice is right once, a wrong sound is said but not right,
    a sentence no template makes is "unknown"; accuracy is right over the clip's events."""
    toy = ToyJudge()
    events = [{"text": "A red circle appears.", "key": ["appear", "red", "circle"], "type": "visual"},
              {"text": "A low tone plays.", "key": ["tone", "low"], "type": "sound"}]
    caption = "A red circle appears. A red circle appears. A high tone plays. The cat sat on the mat."
    said, right, total = toy.sentence_counts([caption], [{"events": events}])
    assert (said, right, total) == ({"visual": 2, "sound": 1, "unknown": 1}, {"visual": 1, "sound": 0, "unknown": 0},
                                    {"visual": 1, "sound": 1})
    assert toy.accuracy([caption], [{"events": events}]) == {"sound": 0.0, "visual": 1.0}


def test_no_judged_item_gives_no_rate():
    """A judge that failed on every item must not look like a perfect model (Total 0 %)."""
    with pytest.raises(ValueError, match="no rate"):
        rates([])


def test_the_toy_judge_and_the_llm_judge_share_one_interface():
    """judge(caption, events) -> counts and judge_all(items) -> (results, errors) on either judge, with the manifest's
    events as they are (the toy's are dicts with a key and a sentence)."""
    toy = ToyJudge()
    events = [{"text": "A red circle appears.", "key": ["appear", "red", "circle"], "type": "visual"},
              {"text": "A low tone plays.", "key": ["tone", "low"], "type": "sound"}]
    caption = "A red circle appears. A high tone plays. The digit 7 appears on screen."
    assert toy.judge(caption, events) == {"events": 2, "matched": 1, "missed": 0, "incorrect": 1, "hallucinated": 1}
    results, errors = toy.judge_all([{"id": "a", "caption": caption, "events": events}])
    assert errors == {} and results == [{"id": "a", "events": 2, "matched": 1, "missed": 0, "incorrect": 1, "hallucinated": 1}]
    assert toy.accuracy([caption], [{"events": events}]) == {"sound": 0.0, "visual": 1.0}
    assert set(dir(LLMJudge)) >= {"judge", "judge_all", "close"} and set(dir(ToyJudge)) >= {"judge", "judge_all", "close"}
