"""The dataset preparers (data/<name>/prepare.py), each run on a miniature copy of its dataset's published layout
(the exact folder, file and column names; media written with PyAV): the manifests they write as data.read_manifest
reads them, every malformed row and missing file named and counted, a wrong --root refused with exit status 2; then
the alignment and SFT manifests train one step, and the Video-MME and caption-benchmark manifests go through eval.py."""
import contextlib
import importlib.util
import io
import json
import os
import wave

import av
import numpy as np
import pytest

import eval as ev
from data import audible_fraction, read_manifest
from test_av_model import tiny_checkpoint  # noqa: F401 (a fixture)
from test_judge import server  # noqa: F401 (a fixture)
from test_media import write_video, write_wav
from conftest import make_tokenizer
from test_eval import run_eval
from test_train import ROOT, final_weights, run, write_config

PREPARERS = ("librispeech", "audiocaps", "wavcaps", "commonvoice", "vs2_testset", "videomme", "finevideo", "llava_video")
PARQUET = ("videomme", "finevideo")  # read with pyarrow, from requirements-data.txt


def prepare(name, *args):
    """Run data/<name>/prepare.py's main in this process -> what it printed."""
    spec = importlib.util.spec_from_file_location(f"prepare_{name}", os.path.join(ROOT, "data", name, "prepare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        module.main([str(a) for a in args])
    return out.getvalue()


def write_audio(path, seconds, tone, codec, rate=16000):
    """A mono sine tone as FLAC (LibriSpeech's format) or MP3 (Common Voice's), encoded with PyAV."""
    fmt = {"flac": "s16", "libmp3lame": "fltp"}[codec]
    s = 0.5 * np.sin(2 * np.pi * tone * np.arange(round(seconds * rate)) / rate)
    data = (s * 32767).astype(np.int16) if fmt == "s16" else s.astype(np.float32)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        step = stream.codec_context.frame_size or 1024
        for k in range(0, len(data), step):
            frame = av.AudioFrame.from_ndarray(data[None, k:k + step], format=fmt, layout="mono")
            frame.rate, frame.pts = rate, k
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def mkdirs(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return path


def skipped(out):
    """{where: reason} of the lines a preparer printed for the rows it left out."""
    return dict(line.split(": skipped: ") for line in out.splitlines() if ": skipped: " in line)


def summary(out, name):
    return next(line for line in out.splitlines() if line.startswith(f"{name}: written "))


# -----------------------------------------------------------------------------
# the miniature layouts, each prepared into its own manifests/ folder (module-scoped: the stage tests reuse them)


@pytest.fixture(scope="module")
def librispeech(tmp_path_factory):
    root, d = tmp_path_factory.mktemp("librispeech"), tmp_path_factory.mktemp("manifests")
    chapter = root / "LibriSpeech" / "train-clean-100" / "19" / "198"
    write_audio(chapter / "19-198-0000.flac", 1.5, 440.0, "flac")
    write_audio(chapter / "19-198-0001.flac", 1.0, 660.0, "flac")
    (chapter / "19-198.trans.txt").write_text("19-198-0000 NORTHANGER ABBEY\n19-198-0001 THIS  LITTLE WORK\n"
                                               "19-198-0002 WAS FINISHED IN THE YEAR\n19-198-0003\n")  # no flac; no text
    dev = root / "LibriSpeech" / "dev-clean" / "1272" / "128104"
    write_audio(dev / "1272-128104-0000.flac", 1.2, 330.0, "flac")
    (dev / "1272-128104.trans.txt").write_text("1272-128104-0000 MISTER QUILTER IS THE APOSTLE\n")
    return d, prepare("librispeech", f"--root={root}", f"--out={d}")


@pytest.fixture(scope="module")
def audiocaps(tmp_path_factory):
    root, d = tmp_path_factory.mktemp("audiocaps"), tmp_path_factory.mktemp("manifests")
    (root / "train.csv").write_text('audiocap_id,youtube_id,start_time,caption\n'
                                    '91139,r1nicOVtvkQ,130,"A woman talks nearby, as water pours"\n'
                                    '58146,UDGBjjwyaqE,20,Multiple clanging and clanking sounds\n'
                                    '11543,3MoF8myFs8Y,290,A gunshot is fired\n'  # gone from YouTube: no audio
                                    '11544,3MoF8myFs8Y,290,too,many,fields\n')
    write_wav(mkdirs(root / "train" / "91139.wav"), 1.5, 440.0)
    write_wav(root / "train" / "58146.wav", 1.0, 880.0)
    (root / "val.csv").write_text("audiocap_id,youtube_id,start_time,caption,note\n97151,vfY_TJq7n_U,130,Ducks quack,x\n")
    write_audio(root / "val" / "97151.flac", 1.0, 550.0, "flac")
    return d, prepare("audiocaps", f"--root={root}", f"--out={d}")


@pytest.fixture(scope="module")
def wavcaps(tmp_path_factory):
    root, d = tmp_path_factory.mktemp("wavcaps"), tmp_path_factory.mktemp("manifests")
    sb = {"num_captions_per_audio": 1, "data": [
        {"title": "Airplane Landing Airport", "description": "Large commercial airplane landing.", "author": "Daniel Simion",
         "href": "2219-Airplane-Landing-Airport.html", "caption": "An airplane is landing.", "id": "2219",
         "duration": 1.5, "audio": "wav_path", "download_link": "http://soundbible.com/grab.php?id=2219&type=wav"},
        {"title": "Service Bell Help", "caption": "Someone is ringing a bell.", "id": "2218", "duration": 1.6,
         "audio": "wav_path"},  # its audio was not extracted
        {"title": "No caption", "id": "2217", "duration": 1.0, "audio": "wav_path"}]}
    audioset = {"num_captions_per_audio": 1, "data": [
        {"id": "Y-0RhRKNlzHc.wav", "caption": "A man speaks as a motor runs.", "audio": "wav_path", "duration": 1.0},
        {"id": "YvfY_TJq7n_U.wav", "caption": "Ducks quack.", "audio": "wav_path", "duration": 1.0}]}
    for source, name, table in (("SoundBible", "sb_final.json", sb), ("AudioSet_SL", "as_final.json", audioset)):
        (mkdirs(root / "json_files" / source / name)).write_text(json.dumps(table))
    (mkdirs(root / "json_files" / "blacklist" / "blacklist_exclude_test_ac.json")).write_text(
        json.dumps({"AudioSet": ["YvfY_TJq7n_U.wav"], "FreeSound": []}))
    write_audio(root / "SoundBible" / "mnt" / "SoundBible_flac" / "2219.flac", 1.5, 440.0, "flac")
    write_audio(root / "AudioSet_SL" / "Y-0RhRKNlzHc.flac", 1.0, 660.0, "flac")
    write_audio(root / "AudioSet_SL" / "YvfY_TJq7n_U.flac", 1.0, 770.0, "flac")
    return d, prepare("wavcaps", f"--root={root}", f"--out={d}")


CV_HEADER = "client_id\tpath\tsentence_id\tsentence\tsentence_domain\tup_votes\tdown_votes\tage\tgender\taccents\tvariant\tlocale\tsegment\n"


@pytest.fixture(scope="module")
def commonvoice(tmp_path_factory):
    root, d = tmp_path_factory.mktemp("cv-corpus") / "en", tmp_path_factory.mktemp("manifests")
    write_audio(root / "clips" / "common_voice_en_1.mp3", 1.5, 440.0, "libmp3lame")
    write_audio(root / "clips" / "common_voice_en_2.mp3", 1.0, 660.0, "libmp3lame")
    (root / "train.tsv").write_text(CV_HEADER + 'a1\tcommon_voice_en_1.mp3\ts1\t"Quoted" words, kept as written.\t\t2\t0\t\t\t\t\ten\t\n'
                                    "a2\tcommon_voice_en_9.mp3\ts2\tNo clip for this one.\t\t2\t0\t\t\t\t\ten\t\n"
                                    "a3\tcommon_voice_en_2.mp3\ts3\ttoo few fields\n")
    (root / "dev.tsv").write_text(CV_HEADER.replace("\n", "\tfuture\n") + "a4\tcommon_voice_en_2.mp3\ts4\tThe dev sentence.\t\t3\t0\t\t\t\t\ten\t\t\n")
    return d, prepare("commonvoice", f"--root={root}", f"--out={d}")


@pytest.fixture(scope="module")
def vs2_testset(tmp_path_factory):
    root, d = tmp_path_factory.mktemp("vs2_testset"), tmp_path_factory.mktemp("manifests")
    turns = lambda caption: [{"from": "human", "value": "<image>\nDescribe the video in detail."}, {"from": "gpt", "value": caption}]
    (root / "video_salmonn2_test.json").write_text(json.dumps([
        {"video": "0.mp4", "conversations": turns("A grey screen brightens while a tone plays."),
         "events": ["A grey screen brightens.", "A tone plays."]},
        {"video": "1.mp4", "conversations": turns("Missing."), "events": ["Nothing."]},  # not downloaded
        {"video": "2.mp4", "conversations": turns("No events.")}]))
    write_video(mkdirs(root / "video" / "0.mp4"), 2, fps=4, size=(32, 32))
    return d, prepare("vs2_testset", f"--root={root}", f"--out={d}")


SRT = """1
00:00:00,000 --> 00:00:01,500
<font color="white" size=".72c">Welcome to the race.</font>

2
00:00:10,000 --> 00:00:12,000
<font color="white" size=".72c">Never seen: after the video's end.</font>
"""


@pytest.fixture(scope="module")
def videomme(tmp_path_factory):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    root, d = tmp_path_factory.mktemp("videomme"), tmp_path_factory.mktemp("manifests")
    rows = []
    for i, (vid, duration, answer) in enumerate([("fFjv93ACGo8", "short", "A"), ("MPWeUaTQWMU", "medium", "C"),
                                                 ("ZoSHHG5xqdc", "long", "B"), ("notextracted", "short", "D"),
                                                 ("fFjv93ACGo8", "short", "E")]):
        rows.append({"video_id": f"{i + 1:03d}", "duration": duration, "domain": "Sports Competition",
                     "sub_category": "Athletics", "url": f"https://www.youtube.com/watch?v={vid}", "videoID": vid,
                     "question_id": f"{i + 1:03d}-1", "task_type": "Counting Problem", "question": f"Question {i}?",
                     "options": ["A. one.", "B. two.", "C. three.", "D. four."], "answer": answer})
    pq.write_table(pa.Table.from_pylist(rows), mkdirs(root / "videomme" / "test-00000-of-00001.parquet"))
    for i, vid in enumerate(("fFjv93ACGo8", "MPWeUaTQWMU", "ZoSHHG5xqdc")):
        write_video(mkdirs(root / "data" / f"{vid}.mp4"), 2 + i, fps=4, size=(32, 32), tone=440.0 * (i + 1))
    (mkdirs(root / "subtitle" / "fFjv93ACGo8.srt")).write_text(SRT)
    return d, prepare("videomme", f"--root={root}", f"--out={d}")


def finevideo_json(description, activities, qa):
    scene = {"sceneId": 1, "title": "Intro", "activities": [{"description": a, "timestamp": {
        "start_timestamp": "00:00:00.000", "end_timestamp": "00:00:01.000"}} for a in activities],
        "audioVisualCorrelation": 0.8, "cast": ["Host"], "dynamismScore": 0.7, "mood": {"description": "Calm", "keyMoments": []},
        "timestamps": {"start_timestamp": "00:00:00.000", "end_timestamp": "00:00:02.000"}}
    return {"content_fine_category": "Engineering Projects", "content_parent_category": "Education", "duration_seconds": 2,
            "resolution": "32x32", "youtube_title": "A title", "text_to_speech_word_count": 3,
            "content_metadata": {"title": "T", "description": description, "fps": 4.0, "scenes": [scene],
                                 "qAndA": [{"question": q, "answer": a} for q, a in qa],
                                 "characterList": [{"characterId": "1", "name": "Host", "description": "A presenter."}]}}


@pytest.fixture(scope="module")
def finevideo(tmp_path_factory):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    root, d = tmp_path_factory.mktemp("finevideo"), tmp_path_factory.mktemp("manifests")
    clips = [write_video(root / f"{k}.mp4", 2, fps=4, size=(32, 32), tone=t).read_bytes() for k, t in ((0, 440.0), (1, None))]
    meta = finevideo_json("A host explains a kettle.", ["The host points at the kettle.", "Water boils."],
                          [("What boils?", "Water."), ("Who speaks?", "The host.")])
    rows = [{"mp4": clips[0], "json": meta}, {"mp4": clips[1], "json": meta},  # the second has no audio track
            {"mp4": clips[0], "json": {**meta, "content_metadata": None}}]
    pq.write_table(pa.Table.from_pylist(rows), mkdirs(root / "data" / "train-00000-of-00001.parquet"))
    return d, root, prepare("finevideo", f"--root={root}", f"--out={d}", "--val_fraction=0")


@pytest.fixture(scope="module")
def llava_video(tmp_path_factory):
    root, d = tmp_path_factory.mktemp("llava_video"), tmp_path_factory.mktemp("manifests")
    subset = root / "0_30_s_academic_v0_1"
    row = lambda id_, video, *turns: {"id": id_, "conversations": [{"from": f, "value": v} for f, v in turns],
                                      "data_source": "0_30_s_academic_v0_1", "video": video}
    (mkdirs(subset / "0_30_s_academic_v0_1_cap_processed.json")).write_text(json.dumps([
        row("Q04US", "academic_source/Charades/Q04US.mp4", ("human", "<image>\nDescribe what is happening in the video in detail."),
            ("gpt", "A person opens a door.")),
        row("MISS1", "academic_source/Charades/MISS1.mp4", ("human", "<image>\nDescribe the video."), ("gpt", "..."))]))
    (subset / "0_30_s_academic_oe_v0_1_qa_processed.json").write_text(json.dumps([
        row("Q04US", "academic_source/Charades/Q04US.mp4", ("human", "<image>\nWhat opens?"), ("gpt", "A door."),
            ("human", "Who opens it?"), ("gpt", "A person.")),
        row("BAD", "academic_source/Charades/Q04US.mp4", ("gpt", "An answer first."))]))
    (subset / "0_30_s_academic_mc_v0_1_qa_processed.json").write_text(json.dumps([
        row("SILENT", "academic_source/Charades/SILENT.mp4", ("human", "<image>\nWhat is seen?\nA. a door\nB. a cat\n"
            "Answer with the option's letter from the given choices directly."), ("gpt", "A."))]))
    write_video(mkdirs(subset / "academic_source" / "Charades" / "Q04US.mp4"), 2, fps=4, size=(32, 32), colour=(200, 30, 30))
    write_video(subset / "academic_source" / "Charades" / "SILENT.mp4", 2, fps=4, size=(32, 32), tone=None)
    return d, prepare("llava_video", f"--root={root}", f"--out={d}", "--val_fraction=0")


# -----------------------------------------------------------------------------
# what each preparer writes


def test_librispeech(librispeech):
    d, out = librispeech
    train, dev = read_manifest(str(d / "librispeech_train.jsonl")), read_manifest(str(d / "librispeech_dev.jsonl"))
    assert [(it["id"], it["task"], it["prompt"], it["response"]) for it in train] == [
        ("19-198-0000", "asr", "Please transcribe the speech.", "northanger abbey"),
        ("19-198-0001", "asr", "Please transcribe the speech.", "this little work")]
    assert [it["response"] for it in dev] == ["mister quilter is the apostle"] and not (d / "librispeech_test.jsonl").exists()
    assert all(os.path.exists(it["audio"]) and it["audio"].endswith(f"{it['id']}.flac") for it in train + dev)
    assert [r.split(" (")[0] for r in skipped(out).values()] == ["missing audio", "malformed line"]
    assert all(w.endswith(("19-198.trans.txt:3", "19-198.trans.txt:4")) for w in skipped(out))
    assert summary(out, "librispeech") == "librispeech: written 3, skipped 2 (malformed line: 1, missing audio: 1)"


def test_audiocaps(audiocaps):
    d, out = audiocaps
    train, val = read_manifest(str(d / "audiocaps_train.jsonl")), read_manifest(str(d / "audiocaps_val.jsonl"))
    assert [(it["id"], it["task"], it["prompt"], it["response"]) for it in train] == [
        ("91139", "audio_caption", "Please describe the audio.", "A woman talks nearby, as water pours"),
        ("58146", "audio_caption", "Please describe the audio.", "Multiple clanging and clanking sounds")]
    assert val[0]["audio"].endswith("val/97151.flac") and val[0]["response"] == "Ducks quack"
    assert {w.rsplit(":", 1)[1]: r.split(" (")[0] for w, r in skipped(out).items()} == {"4": "missing audio", "5": "malformed row"}
    assert any(line.endswith("val.csv: columns not read: note") for line in out.splitlines())
    assert summary(out, "audiocaps") == "audiocaps: written 3, skipped 2 (malformed row: 1, missing audio: 1)"


def test_wavcaps(wavcaps):
    d, out = wavcaps
    items = read_manifest(str(d / "wavcaps_train.jsonl"))
    assert sorted((it["id"], it["response"]) for it in items) == [("AudioSet_SL/Y-0RhRKNlzHc.wav", "A man speaks as a motor runs."),
                                                                 ("SoundBible/2219", "An airplane is landing.")]
    assert all(it["task"] == "audio_caption" and os.path.exists(it["audio"]) for it in items)
    assert sorted(r.split(" (")[0] for r in skipped(out).values()) == ["in the AudioCaps/Clotho test sets", "malformed row",
                                                                       "missing audio"]
    assert summary(out, "wavcaps").startswith("wavcaps: written 2, skipped 3")


def test_commonvoice(commonvoice):
    d, out = commonvoice
    train, dev = read_manifest(str(d / "commonvoice_train.jsonl")), read_manifest(str(d / "commonvoice_dev.jsonl"))
    assert [(it["id"], it["task"], it["response"]) for it in train] == [("common_voice_en_1", "asr", '"Quoted" words, kept as written.')]
    assert [it["response"] for it in dev] == ["The dev sentence."] and dev[0]["audio"].endswith("clips/common_voice_en_2.mp3")
    assert {w.rsplit(":", 1)[1]: r.split(" (")[0] for w, r in skipped(out).items()} == {"3": "missing audio", "4": "malformed row"}
    assert [line.rsplit("/", 1)[1] for line in out.splitlines() if "columns not read" in line] == ["dev.tsv: columns not read: future"]
    assert summary(out, "commonvoice") == "commonvoice: written 2, skipped 2 (malformed row: 1, missing audio: 1)"


def test_vs2_testset(vs2_testset):
    d, out = vs2_testset
    [item] = read_manifest(str(d / "caption_test.jsonl"))
    assert (item["id"], item["task"], item["prompt"], item["events"]) == (
        "0.mp4", "caption", "Describe the video in detail.", ["A grey screen brightens.", "A tone plays."])
    assert item["response"] == "A grey screen brightens while a tone plays." and item["video"].endswith("video/0.mp4")
    assert [r.split(" (")[0] for r in skipped(out).values()] == ["missing video", "malformed item"]
    assert summary(out, "vs2_testset").startswith("vs2_testset: written 1, skipped 2")


def test_videomme(videomme):
    d, out = videomme
    plain, subs = ev.read_qa(str(d / "videomme.jsonl")), ev.read_qa(str(d / "videomme_subs.jsonl"))
    assert [(it["id"], it["duration"], it["answer"]) for it in plain] == [("001-1", "short", "A"), ("002-1", "medium", "C"),
                                                                       ("003-1", "long", "B")]
    assert plain[0]["prompt"] == ev.QA_PROMPT.format(question="Question 0?", options="A. one.\nB. two.\nC. three.\nD. four.")
    assert [it["id"] for it in subs] == ["001-1", "002-1", "003-1"]
    # the first video (2 s at 1 fps: frames at 0 and 1 s) shows the first cue, never the second, without the font tags
    assert subs[0]["prompt"].startswith("This video's subtitles are listed below:\nWelcome to the race.\nSelect the best answer")
    assert "Never seen" not in subs[0]["prompt"] and "<font" not in subs[0]["prompt"]
    assert "listed below:\nNo subtitles available\n" in subs[1]["prompt"]
    assert subs[2]["prompt"].endswith("Question 2?\nA. one.\nB. two.\nC. three.\nD. four.\nThe best answer is:")
    assert [r.split(" (")[0] for r in skipped(out).values()] == ["missing video", "malformed row"]
    assert summary(out, "videomme").startswith("videomme: written 3, skipped 2")


def test_finevideo(finevideo):
    d, root, out = finevideo
    items = read_manifest(str(d / "finevideo_train.jsonl"))
    assert [(it["id"], it["task"], it["response"]) for it in items] == [
        ("train-00000-of-00001_0000", "caption", "A host explains a kettle. The host points at the kettle. Water boils."),
        ("train-00000-of-00001_0000_qa0", "qa", "Water."), ("train-00000-of-00001_0000_qa1", "qa", "The host.")]
    assert [it["prompt"] for it in items[1:]] == ["What boils?", "Who speaks?"] and not read_manifest(str(d / "finevideo_val.jsonl"))
    assert open(items[0]["video"], "rb").read() == (root / "0.mp4").read_bytes()  # the Parquet's bytes, written out
    assert sorted(os.listdir(root / "videos")) == ["train-00000-of-00001_0000.mp4"]  # the silent one is not kept
    assert [r.split(" (")[0] for r in skipped(out).values()] == ["too little audio", "malformed row"]
    assert summary(out, "finevideo") == "finevideo: written 3, skipped 2 (malformed row: 1, too little audio: 1)"


def test_llava_video(llava_video):
    d, out = llava_video
    items = read_manifest(str(d / "llava_video_train.jsonl"))
    assert [(it["id"], it["task"], it["prompt"], it["response"]) for it in items] == [  # the files in name order: mc, oe, cap
        ("0_30_s_academic_v0_1/Q04US", "qa", "What opens?", "A door."), ("0_30_s_academic_v0_1/Q04US_1", "qa", "Who opens it?", "A person."),
        ("0_30_s_academic_v0_1/Q04US", "caption", "Describe what is happening in the video in detail.", "A person opens a door.")]
    assert all(it["video"].endswith("academic_source/Charades/Q04US.mp4") for it in items)
    assert sorted(r.split(" (")[0] for r in skipped(out).values()) == ["malformed item", "missing video", "too little audio"]
    assert summary(out, "llava_video").startswith("llava_video: written 3, skipped 3")


def test_audible_fraction_counts_the_seconds_heard(tmp_path):
    """--min_audio's measure: 3 s of tone, 1 s of silence and 2 s of a -60 dB hum are heard in half of their 6 s."""
    rate, t = 16000, np.arange(16000 * 3) / 16000
    audio = np.concatenate([0.5 * np.sin(2 * np.pi * 440 * t), np.zeros(rate), 0.001 * np.sin(2 * np.pi * 440 * t[:2 * rate])])
    with wave.open(str(tmp_path / "a.wav"), "wb") as f:
        f.setnchannels(1), f.setsampwidth(2), f.setframerate(rate)
        f.writeframes((audio * 32767).astype("<i2").tobytes())
    assert audible_fraction(str(tmp_path / "a.wav")) == 0.5
    assert audible_fraction(str(write_video(tmp_path / "mute.mp4", 2, fps=4, size=(32, 32), tone=None))) == 0.0


@pytest.mark.parametrize("name", PREPARERS)
def test_a_root_of_another_layout_exits_2_saying_what_was_expected(name, tmp_path, capsys):
    if name in PARQUET:
        pytest.importorskip("pyarrow")
    (tmp_path / "README.md").write_text("not a dataset")
    with pytest.raises(SystemExit) as e:
        prepare(name, f"--root={tmp_path}", f"--out={tmp_path / 'manifests'}")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "expected" in err and str(tmp_path) in err
    assert not (tmp_path / "manifests").exists()


# -----------------------------------------------------------------------------
# the stages and evaluations that read them


def test_alignment_trains_a_step_on_the_four_alignment_manifests(librispeech, audiocaps, wavcaps, commonvoice, tmp_path):
    manifests = [str(d / f) for d, f in ((librispeech[0], "librispeech_train.jsonl"), (audiocaps[0], "audiocaps_train.jsonl"),
                                         (wavcaps[0], "wavcaps_train.jsonl"), (commonvoice[0], "commonvoice_train.jsonl"))]
    make_tokenizer(tmp_path / "tokenizer.json")
    cfg = write_config(tmp_path / "align.py", tmp_path, tmp_path / "align", train_data=",".join(manifests), trainable=("audio.",),
                       steps=1, batch_size=2)
    out = run(["train_align.py", cfg])
    assert "align: 7 items (0 skipped)" in out.stdout and final_weights(tmp_path / "align")


def test_sft_trains_a_step_on_the_finevideo_and_llava_video_manifests(finevideo, llava_video, tmp_path):
    manifests = [str(finevideo[0] / "finevideo_train.jsonl"), str(llava_video[0] / "llava_video_train.jsonl")]
    make_tokenizer(tmp_path / "tokenizer.json")
    cfg = write_config(tmp_path / "sft.py", tmp_path, tmp_path / "sft", train_data=",".join(manifests), steps=1, batch_size=2)
    out = run(["train_sft.py", cfg])
    assert "sft: 6 items (0 skipped)" in out.stdout and final_weights(tmp_path / "sft")


def test_qa_accuracy_by_duration_class(tmp_path, monkeypatch):
    """Table 4's S / M / L columns: the accuracy over the items of each duration class, and only where items carry one."""
    items = [{"id": str(i), "video": "a.mp4", "question": "Q?", "options": ["A. x", "B. y", "C. z", "D. w"], "answer": "A",
              "duration": d} for i, d in enumerate(["short", "short", "medium", "long", "long", "long"])]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    texts = ["A", "B", "no idea", "A", "A", "C"]
    monkeypatch.setattr(ev, "answers", lambda model, tok, items, c, n, use_audio: (items, [(t, True) for t in texts]))
    c = {"manifest": str(tmp_path / "qa.jsonl"), "limit": 0, "use_audio": True, "answer_tokens": 8, "out_dir": str(tmp_path)}
    out = ev.qa_benchmark(lambda: (None, None), c)
    assert out["accuracy"] == pytest.approx(3 / 6) and out["items"] == 6 and out["no_letter"] == 1
    assert out["by_duration"] == {"short": {"accuracy": 0.5, "items": 2}, "medium": {"accuracy": 0.0, "items": 1},
                                  "long": {"accuracy": pytest.approx(2 / 3), "items": 3}}


def test_eval_qa_on_the_videomme_manifest(videomme, tiny_checkpoint, tmp_path):  # noqa: F811
    manifest = videomme[0] / "videomme_subs.jsonl"
    run(["eval.py", "--task=qa", f"--ckpt={tiny_checkpoint}", f"--manifest={manifest}", f"--out_dir={tmp_path}",
         f"--cache_dir={tmp_path / 'cache'}", "--answer_tokens=2"])
    rows = json.loads((tmp_path / "qa.json").read_text())
    res = json.loads((tmp_path / "results.json").read_text())["qa"]
    assert [r["id"] for r in rows] == ["001-1", "002-1", "003-1"] and res["items"] == 3
    assert res["by_duration"] == {d: {"accuracy": float(r["correct"]), "items": 1} for d, r in zip(("short", "medium", "long"), rows)}


def test_eval_captions_on_the_caption_test_manifest(vs2_testset, tiny_checkpoint, tmp_path, server):  # noqa: F811
    run_eval("--task=captions", f"--ckpt={tiny_checkpoint}", f"--manifest={vs2_testset[0] / 'caption_test.jsonl'}",
             f"--out_dir={tmp_path}", f"--cache_dir={tmp_path / 'cache'}", "--caption_tokens=4", "--judge_model=test-judge",
             f"--judge_cache={tmp_path / 'judge.sqlite'}", port=server.server_port)
    [row] = json.loads((tmp_path / "captions.json").read_text())
    assert row["id"] == "0.mp4" and (row["missed"], row["incorrect"], row["hallucinated"], row["events"]) == (0, 0, 0, 2)
    assert len(server.requests) == 7 and all("A grey screen brightens." in b["messages"][0]["content"] + b["messages"][1]["content"]
                                             for b in server.requests)
