"""
Judging captions against atomic events (paper 3.3.1, Appendix F): missing events (in the ground truth,
absent from the caption), incorrect events (in the ground truth, described wrongly) and hallucinated
events (in the caption, absent from the ground truth). Miss = missing / N, Hall = (incorrect +
hallucinated) / N, Total = Miss + Hall, with N the number of ground-truth atomic events; over a set of
captions the counts are summed before dividing (corpus level), as the released evaluation does.

Two judges with one interface, judge(caption, events) -> counts and judge_all(items) -> (results, errors), so
training and evaluation never ask which one they hold: the exact judge of the toy world (ToyJudge), and the LLM
judge of the paper (LLMJudge). The LLM judge is an LLMClient: a client of any OpenAI-compatible server (OpenAI
itself, or a local vLLM / Ollama serving e.g. Qwen3-4B, which the paper found as good a judge for MrDPO training
as GPT-3.5, Appendix B), which also splits reference captions into atomic events and answers QA from captions.
$ export OPENAI_API_KEY=sk-...                                            # OpenAI, gpt-3.5-turbo-0125 by default
$ export OPENAI_BASE_URL=http://127.0.0.1:8000/v1 JUDGE_MODEL=Qwen/Qwen3-4B  # or a local server
>>> judge = LLMJudge()
>>> judge.judge(caption, events)                          # the GPT-3.5 role: {"events", "missed", "incorrect", ...}
>>> median_of_runs(judge, items)                          # the released benchmark protocol: 7 seeds, median Total
>>> LLMClient("gpt-4o").decompose(reference_caption)      # the GPT-4o role: a reference caption -> atomic events
Every answer is kept in an SQLite file (out/judge_cache.sqlite), so no paid request is ever made twice.
"""
import ast
import hashlib
import importlib.util
import json
import os
import random
import re
import sqlite3
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import openai

from config import UserError


def rates(judgments):
    """Corpus-level Miss, Hall and Total of a list of judgments (dicts of counts), and how many were judged.
    ValueError when there is nothing to divide by: no judged item (or no event) gives no rate, never 0 %."""
    n = sum(j["events"] for j in judgments)
    if not n:
        raise ValueError(f"no rate: {len(judgments)} items judged, {n} ground-truth events")
    miss = sum(j["missed"] for j in judgments) / n
    hall = sum(j["incorrect"] + j["hallucinated"] for j in judgments) / n
    return {"miss": miss, "hall": hall, "total": miss + hall, "judged": len(judgments)}


def event_texts(events):
    """Atomic events as sentences (a toy manifest's are dicts with the sentence under "text")."""
    return [e["text"] if isinstance(e, dict) else e for e in events]


# -----------------------------------------------------------------------------
# the exact judge of the toy world, where every caption sentence maps back to an event key


class ToyJudge:
    """The exact judge of the toy world (data/toyav/prepare.py): the caption is parsed back into event keys and
    compared with the clip's known keys (toy_judge). Never fails, so judge_all has no errors."""

    def __init__(self):
        spec = importlib.util.spec_from_file_location("toyav", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                            "data", "toyav", "prepare.py"))
        self.world = importlib.util.module_from_spec(spec)  # data.py takes the name `data`: loaded from its file
        spec.loader.exec_module(self.world)

    @staticmethod
    def reads(events):
        """Whether a manifest item's events are the toy world's, the only ones this judge can compare with."""
        return isinstance(events, list) and all(isinstance(e, dict) and isinstance(e.get("key"), list) for e in events)

    def judge(self, caption, events, truncated=False, name=None, seed=None):
        return toy_judge(self.world.parse_caption(caption), [e["key"] for e in events])

    def judge_all(self, items, seed=None, workers=None):
        return [{"id": it.get("id", i), **self.judge(it["caption"], it["events"])} for i, it in enumerate(items)], {}

    def sentence_counts(self, captions, items, kind=None):
        """By event type (visual, sound, speech; "unknown": a sentence no template makes), or by kind(key) when given
        (key[0]: appear, move, say, ...), three Counters: the sentences the captions state, how many of them are right
        (an event of the clip, each counted once), and the clips' events."""
        kind = kind or (lambda key: "unknown" if key[0] == "unknown" else self.world.event_type(list(key)))
        said, right, events = Counter(), Counter(), Counter()
        for caption, it in zip(captions, items):
            truth = Counter(tuple(e["key"]) for e in it["events"])
            for key, n in Counter(map(tuple, self.world.parse_caption(caption))).items():
                said[kind(key)] += n
                right[kind(key)] += min(n, truth[key])
            events.update(kind(key) for key in truth.elements())
        return said, right, events

    def accuracy(self, captions, items):
        """The fraction of ground-truth events of each type (visual, sound, speech) that the captions state exactly."""
        _, right, events = self.sentence_counts(captions, items)
        return {t: right[t] / events[t] for t in sorted(events)}

    def close(self):
        pass


def toy_judge(caption_keys, event_keys):
    """Counts, with no LLM, for a toy caption parsed into event keys ([kind, *slots]; ["unknown", text]
    for a sentence no template makes) against the clip's known keys. A caption event equal to a
    ground-truth one matches it; a leftover caption event of the same kind as a leftover ground-truth
    event (the red circle called blue, another word said) is that event described incorrectly; the
    remaining ground-truth events are missing, the remaining caption events hallucinated."""
    said, truth = Counter(map(tuple, caption_keys)), Counter(map(tuple, event_keys))
    matched = said & truth
    unsaid, extra = truth - matched, said - matched
    incorrect = 0
    for kind in {k[0] for k in unsaid}:
        incorrect += min(sum(v for k, v in unsaid.items() if k[0] == kind), sum(v for k, v in extra.items() if k[0] == kind))
    return {"events": len(event_keys), "matched": sum(matched.values()), "missed": sum(unsaid.values()) - incorrect,
            "incorrect": incorrect, "hallucinated": sum(extra.values()) - incorrect}


# -----------------------------------------------------------------------------
# the LLM judge: settings of the released benchmark eval.py (HF dataset tsinghua-ee/video-SALMONN_2_testset)
JUDGE_MODEL = "gpt-3.5-turbo-0125"  # the judge of the paper's tables; env JUDGE_MODEL overrides it
TEMPERATURE = 0.0
TOP_P = 0.1
SEED = 2024  # the first run's seed; the next runs, and re-asks after an answer that did not parse, take the next ones
RUNS = 7  # the whole set is judged this many times and the run with the median Total is reported
# ours: robustness against a busy or flaky server
MAX_ATTEMPTS = 4  # failed calls (rate limit, 5xx, time-out, connection, unparseable answer) before an item is given up
BASE_DELAY = 2.0  # seconds before the first retry after a server-side failure; doubled for each further one
MAX_DELAY = 60.0  # longest wait between retries, whatever Retry-After asks
TIMEOUT = 120.0  # seconds one request may take
WORKERS = 8  # items judged concurrently by judge_all (the released eval uses 100 threads)
CACHE_PATH = "out/judge_cache.sqlite"
SQLITE_TIMEOUT = 30.0  # seconds to wait for another process's write to the cache to finish
LOCAL_API_KEY = "EMPTY"  # local servers (vLLM, Ollama) want some key and ignore it
RETRY_STATUS = {408, 409, 429}  # and every 5xx: the server is busy or broken, the request is fine
ITEM_STATUS = {400, 413, 422}  # this request is bad (e.g. too long): its item fails, the others go on
SNIPPET_CHARS = 160  # how much of a bad answer or error an error message quotes
MAX_BRACKETS = 8  # _literal tries the first 8 openings with the last 8 closings, so a runaway answer costs little
REPETITION_N = 4  # word n-gram length of repetition_rate
LOOP_RULES = ((range(1, 50), 5), (range(50, 100), 4))  # reduce_repeated_words: (substring lengths, copies in a row)
MAX_LOOP_COPIES = 201  # the released regex's {k,200}: a longer run becomes one copy per 201

# The released judge prompts, verbatim (typos and the space after "list them out." included: the numbers are comparable
# to the paper's only with the same prompt). The events go in as a Python list (str of the list), as in the released code.
JUDGE_SYSTEM = '''
### Task:
A good video description is one that describes the various details in the video. You task is to judge whether a video description is good or not. You will be provided all the base events in the video, and also a video description to be evaluated. You need to determine which video events are described in the given video description.

### Input Format:
- There are totally {event_num} base events in the video. All the base events in the video will be provided in List format, i.e. ["xxx", "xxx", ...]
- The video description to be evaluated will be provided as well.

### Output Format:
Given the video desciption, besides the events described correctly, there might be events that are missed, described incorrectly and hallucination. You need to determine the number of missed events, incorrect events and hallucination events. You are also required to list these events out.
You output should be in Python dictionary format:

{{"Missed": x, "Incorrect": x, "Hallucination": x, "Missed Event": [...], "Incorrect Event": [...], "Hallucination Event": [...] }}
'''
JUDGE_USER = '''
#### Events In The Video
{events_in_video}

#### Video Description To Be Rated
{cap_to_be_rated}

Given base events in the video and the video description, please count the missed, incorrect and hallucination events and list them out. 
'''

# The GPT-4o prompt that made the benchmark's atomic events is not public; this one asks for what Fig. 5 shows.
DECOMPOSE_SYSTEM = '''### Task:
You will be given a detailed description of a video, covering both what is seen and what is heard. Break it down into atomic events: short, self-contained sentences, each stating exactly one thing that happens, is shown or is heard in the video.

### Rules:
- Cover every event of the description: visual events (people, objects, actions, scene changes, on-screen text), sound events (music, noises) and speech events (who speaks and what is said).
- Keep the order in which the events happen in the video.
- Each sentence must make sense on its own: name the subject ("The diver", "A woman") instead of writing "he", "it" or "they".
- Quote speech and on-screen text exactly as the description gives them.
- Add nothing that the description does not say, and leave nothing out.

### Output Format:
A JSON list of strings and nothing else, for example:
["The video begins with a whale shark swimming in the ocean.", "The whale shark moves slowly through the water.", "The text 'THE WORLD'S BIGGEST LIVING FISH IS A SHARK.' appears in the video.", "A woman says, \\"The world's biggest living fish is a shark.\\"", "Background music can be heard.", "A diver swims near the whale shark."]
'''
DECOMPOSE_USER = '''#### Video Description
{caption}

List the atomic events of this description as a JSON list of strings.
'''
JUDGE_KEYS = {"missed": "missed", "incorrect": "incorrect", "hallucination": "hallucinated"}  # answer key -> ours
THINK = re.compile(r"<think>.*?</think>", re.DOTALL)  # reasoning models (Qwen3) think aloud before they answer


class JudgeError(RuntimeError):
    """An item the judge could not score; the message is one line that names the item."""


class NotACompletion(Exception):
    """A reply with status 200 whose body is not a chat completion (not JSON, or another shape): a broken server or
    proxy, retried as a server error is."""


def _one_line(text, limit=SNIPPET_CHARS):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _literal(text, opening, closing):
    """The first {...} or [...] in an answer that parses as JSON or as a Python literal, whatever surrounds it
    (```json fences, prose, a <think> block)."""
    text = THINK.sub("", text)
    starts = [i for i, c in enumerate(text) if c == opening][:MAX_BRACKETS]
    ends = [i for i, c in enumerate(text) if c == closing][-MAX_BRACKETS:]
    for start in starts:
        for end in reversed(ends):  # longest first: the answer's own lists and dicts close inside it
            if end < start:
                break
            for load in (json.loads, ast.literal_eval):
                try:
                    return load(text[start:end + 1])
                except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
                    pass
    raise ValueError(f"no {opening}...{closing} in the answer parses as JSON or Python")


def _count(value, key):
    """A non-negative whole number, also when written "3" or 3.0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"'{key}' is {value!r}, not a count")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"'{key}' is {value!r}, not a count") from None
    if not (number >= 0 and number.is_integer()):
        raise ValueError(f"'{key}' is {value!r}, not a count")
    return int(number)


def parse_judgment(text, n_events):
    """The judge's answer as {"events": n_events, "missed", "incorrect", "hallucinated", "missed_events",
    "incorrect_events", "hallucinated_events"}. Keys are matched loosely ("Missed Events", "missed"); a count that
    is missing is the length of its list. ValueError if nothing parses or the answer is inconsistent: a ground-truth
    event cannot be both missed and described incorrectly, so missed + incorrect <= n_events."""
    answer = _literal(text, "{", "}")
    if not isinstance(answer, dict):
        raise ValueError("the answer is not a dictionary")
    fields = {" ".join(str(k).replace("_", " ").split()).lower().rstrip("s"): v for k, v in answer.items()}
    out = {"events": n_events}
    for key, name in JUDGE_KEYS.items():
        listed = fields.get(key + " event", [])
        if not isinstance(listed, (list, tuple)):
            raise ValueError(f"'{key} event' is not a list")
        if key not in fields and key + " event" not in fields:
            raise ValueError(f"no '{key}' count or list")
        # the counts, not the lists, make the metric (as in the released eval.py)
        out[name] = _count(fields.get(key, len(listed)), key)
        out[name + "_events"] = [str(e) for e in listed]
    if out["missed"] + out["incorrect"] > n_events:
        raise ValueError(f"missed {out['missed']} + incorrect {out['incorrect']} > {n_events} ground-truth events")
    return out


def parse_events(text):
    """The decomposer's answer as a list of event sentences; ValueError unless it holds a non-empty list of strings."""
    events = _literal(text, "[", "]")
    if not (isinstance(events, list) and events and all(isinstance(e, str) and e.strip() for e in events)):
        raise ValueError("the answer is not a non-empty list of sentences")
    return [e.strip() for e in events]


class AnswerCache:
    """Raw answers of the judge in one SQLite file, keyed by the whole request: model, messages, seed and sampling
    settings. Each answer is committed as soon as it arrives, so a crash loses nothing paid for. WAL mode lets
    several processes share the file; one connection serves all the threads of a process, behind a lock."""

    def __init__(self, path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.db = sqlite3.connect(path, timeout=SQLITE_TIMEOUT, check_same_thread=False)
        self.lock = threading.Lock()
        with self.lock:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("CREATE TABLE IF NOT EXISTS answers "
                            "(key TEXT PRIMARY KEY, request TEXT NOT NULL, answer TEXT NOT NULL)")
            self.db.commit()

    @staticmethod
    def key(request):
        return hashlib.sha256(request.encode()).hexdigest()

    def get(self, request):
        with self.lock:
            row = self.db.execute("SELECT answer FROM answers WHERE key = ?", (self.key(request),)).fetchone()
        return None if row is None else row[0]

    def put(self, request, answer):
        with self.lock:
            self.db.execute("INSERT OR IGNORE INTO answers VALUES (?, ?, ?)", (self.key(request), request, answer))
            self.db.commit()

    def close(self):
        with self.lock:
            self.db.close()


class LLMClient:
    """An LLM over an OpenAI-compatible chat API, every answer cached. model, base_url and api_key default to the
    environment (JUDGE_MODEL, OPENAI_BASE_URL, OPENAI_API_KEY). The openai client's own retries are off: ours retry
    rate limits, 5xx, time-outs and connection errors at the same seed with exponential back-off, and answers that do
    not parse (or are inconsistent) at once with the next seed, as the released evaluation does."""

    def __init__(self, model=None, base_url=None, api_key=None, cache_path=CACHE_PATH, max_attempts=MAX_ATTEMPTS,
                 base_delay=BASE_DELAY, timeout=TIMEOUT, temperature=TEMPERATURE, top_p=TOP_P):
        assert max_attempts >= 1
        self.model = model or os.environ.get("JUDGE_MODEL") or JUDGE_MODEL
        base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        api_key = api_key or os.environ.get("OPENAI_API_KEY") or (LOCAL_API_KEY if base_url else None)
        try:
            self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout, max_retries=0)
        except openai.OpenAIError as e:  # no key, and no local server that would take any
            raise UserError(f"{self.model}: no API key: set OPENAI_API_KEY, or OPENAI_BASE_URL for a local server "
                            f"({_one_line(e)})") from e
        self.cache = AnswerCache(cache_path)
        self.max_attempts, self.base_delay, self.temperature, self.top_p = max_attempts, base_delay, temperature, top_p

    def close(self):
        self.cache.close()
        self.client.close()

    def _complete(self, messages, seed):
        try:
            completion = self.client.chat.completions.create(model=self.model, messages=messages, seed=seed,
                                                             temperature=self.temperature, top_p=self.top_p)
            choices = completion.choices or []
            return (choices[0].message.content or "") if choices else ""  # an empty answer fails to parse, is re-asked
        except (ValueError, AttributeError, TypeError) as e:  # status 200, but the body is no chat completion
            raise NotACompletion(f"the reply is not a chat completion ({type(e).__name__}: {e})") from e

    def _delay(self, failures, error):
        # jitter, so that workers rate-limited together do not all come back together
        delay = self.base_delay * 2 ** (failures - 1) * random.uniform(1.0, 1.25)
        try:
            delay = max(delay, float(error.response.headers.get("retry-after")))
        except (AttributeError, TypeError, ValueError):  # no response, no header, or an HTTP date
            pass
        return min(delay, MAX_DELAY)

    def ask(self, messages, parse, seed, name):
        """parse(answer) of the answer to messages, from the cache when this exact request was answered before.
        A cached answer that does not parse costs nothing: it is skipped, not counted, and the next seed is asked,
        so a bad answer kept from an earlier run never makes an item fail for good."""
        failures, kind, detail = 0, "", ""
        while failures < self.max_attempts:  # bounded: each pass is a failed call or one of finitely many cached answers
            request = json.dumps({"model": self.model, "messages": messages, "seed": seed, "temperature": self.temperature,
                                  "top_p": self.top_p}, sort_keys=True, ensure_ascii=False)
            answer = self.cache.get(request)
            fresh = answer is None
            if fresh:
                try:
                    answer = self._complete(messages, seed)
                except (openai.APIConnectionError, openai.APIStatusError, NotACompletion) as e:  # time-outs included
                    status = getattr(e, "status_code", None)
                    if status in ITEM_STATUS:
                        raise JudgeError(f"{name}: the judge rejected the request: {_one_line(e)}") from e
                    if status is not None and status not in RETRY_STATUS and status < 500:
                        # a wrong key, model name or URL: every item would fail the same way, so the run stops here
                        raise UserError(f"{self.model} at {self.client.base_url}: the server refused the request "
                                        f"({_one_line(e)}); check OPENAI_API_KEY, OPENAI_BASE_URL and the "
                                        f"model name (every answer so far is cached)") from e
                    failures, kind, detail = failures + 1, "no answer from the judge", f"{type(e).__name__}: {_one_line(e)}"
                    if failures < self.max_attempts:
                        time.sleep(self._delay(failures, e))
                    continue
                self.cache.put(request, answer)
            try:
                return parse(answer)
            except ValueError as e:
                # the same seed would give the same answer again
                failures, seed = failures + int(fresh), seed + 1
                kind, detail = "judge answer did not parse", f"{_one_line(e)}: {_one_line(answer)!r}"
        raise JudgeError(f"{name}: {kind} after {failures} attempts: {detail}")

    def decompose(self, caption, seed=SEED, name="caption"):
        """The atomic events of a (reference) caption, a list of sentences: the GPT-4o role of paper 3.3.1."""
        messages = [{"role": "system", "content": DECOMPOSE_SYSTEM},
                    {"role": "user", "content": DECOMPOSE_USER.format(caption=caption)}]
        return self.ask(messages, parse_events, seed, name)


class LLMJudge(LLMClient):
    """The LLM judge of the paper (the GPT-3.5 role, Appendix F), with the released prompts."""

    def judge(self, caption, events, truncated=False, name="caption", seed=SEED):
        """Missed, incorrect and hallucinated events of caption against the ground-truth atomic events, as
        parse_judgment gives them. truncated=True marks a caption that ran out of tokens (the released eval tells it
        by a missing <|im_end|>): its loops are collapsed before judging."""
        events = event_texts(events)
        if truncated:
            caption = reduce_repeated_words(caption)
        messages = [{"role": "system", "content": JUDGE_SYSTEM.format(event_num=len(events))},
                    {"role": "user", "content": JUDGE_USER.format(events_in_video=events, cap_to_be_rated=caption)}]
        return self.ask(messages, lambda answer: parse_judgment(answer, len(events)), seed, name)

    def judge_all(self, items, seed=SEED, workers=WORKERS):
        """Judges items ({"id", "caption", "events", optional "truncated"}; without an id, the index names it) in
        parallel. Returns (results, errors): the judgment of each item that succeeded, with its "id", in the items'
        order, and {id: one-line error} for the others. An item's failure costs no other item its result; an error
        that stops the batch (wrong key or model) loses nothing either, as every answer is already in the cache."""
        def one(i):
            item, ident = items[i], items[i].get("id", i)
            return {"id": ident, **self.judge(item["caption"], item["events"], item.get("truncated", False),
                                              f"item {ident}", seed)}
        outcomes = each(one, range(len(items)), workers)
        results = [o for o in outcomes if isinstance(o, dict)]
        errors = {item.get("id", i): str(o) for i, (item, o) in enumerate(zip(items, outcomes)) if isinstance(o, JudgeError)}
        return results, errors


def each(fn, items, workers=WORKERS):
    """[fn(item) for item in items], run in parallel threads (the LLM calls wait on the network); an item whose
    fn raises JudgeError gets the error as its outcome, so one item's failure costs no other item its result."""
    def one(item):
        try:
            return fn(item)
        except JudgeError as e:
            return e
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, items))


def median_of_runs(judge, items, runs=RUNS, seed=SEED, workers=WORKERS):
    """The released benchmark protocol: judge the whole set runs times, with seeds seed, seed + 1, ..., and report the
    run whose corpus-level Total is the median (index runs // 2 of the runs sorted by Total). Each run's rates are over
    the items judged in that run, as in the released eval.py (there too a re-ask after a bad answer takes the next
    seed, which a later run may share). Returns that run's {"seed", "miss", "hall", "total", "judged",
    "results", "errors"}, plus "runs": {"seed", "miss", "hall", "total", "judged"} of every run in seed order.
    JudgeError when a run judged no item: a judge that fails on everything gives no rate."""
    done = []
    for r in range(runs):
        results, errors = judge.judge_all(items, seed + r, workers)
        if not results:  # no rate at all, never 0 %
            raise JudgeError(f"no rate: the judge failed on all {len(items)} items with seed {seed + r}, e.g. "
                             f"{next(iter(errors.values()), 'no item')}")
        done.append({"seed": seed + r, **rates(results), "results": results, "errors": errors})
    median = sorted(done, key=lambda run: run["total"])[runs // 2]
    return {**median, "runs": [{k: run[k] for k in ("seed", "miss", "hall", "total", "judged")} for run in done]}


# -----------------------------------------------------------------------------
# caption clean-up and repetition


def repetition_rate(text, n=REPETITION_N):
    """How much a caption repeats itself: the fraction of its word n-grams (lower case, punctuation dropped) that
    repeat an n-gram seen earlier in the same caption. 0 when no n-gram recurs; k copies of a long sentence score
    about (k - 1) / k, approaching 1 for a caption stuck in a loop. MrDPO compares it within a caption pair (Δr,
    Appendix C); the paper does not give its formula, so this one is ours."""
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def reduce_repeated_words(text):
    """The released evaluation's clean-up of a caption that ran out of tokens, usually in a loop: any substring of
    1-49 characters repeated 5 or more times in a row, or of 50-99 characters repeated 4 or more times, becomes one
    copy. As in the released code, shorter substrings go first and a repeat does not cross a line break."""
    for lengths, copies in LOOP_RULES:
        for length in lengths:
            text = re.sub(f"(.{{{length}}})\\1{{{copies - 1},{MAX_LOOP_COPIES - 1}}}", r"\1", text)
    return text
