"""mergekit_safety.engine.data: JSONL errors with line numbers, encoding contract, batching, hashes."""

from __future__ import annotations

import json
import warnings

import pytest

from mergekit_safety.engine.data import (
    DataError,
    TruncationWarning,
    batches,
    collate,
    encode_example,
    file_hash,
    read_jsonl,
    records_hash,
    write_jsonl,
)


@pytest.fixture(scope="module")
def tok():
    from mergekit_safety.lab.language import build_tokenizer

    return build_tokenizer()


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_read_jsonl_ok_skips_blank_lines_and_keeps_extra_keys(tmp_path):
    p = _write(tmp_path / "a.jsonl", '{"prompt": "x", "response": "y", "extra": 1}\n\n{"prompt": "z", "response": "w"}\n')
    recs = read_jsonl(p, ["prompt", "response"])
    assert recs == [{"prompt": "x", "response": "y", "extra": 1}, {"prompt": "z", "response": "w"}]


@pytest.mark.parametrize(
    "text, line, fragment",
    [
        ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": }\n', 2, "malformed JSON"),
        ('{"prompt": "a", "response": "b"}\n\n{"prompt": "a"}\n', 3, "missing key 'response'"),
        ('{"prompt": "a", "response": 3}\n', 1, "'response' must be a string"),
        ('{"prompt": "a", "response": "b"}\n["prompt"]\n', 2, "expected a JSON object"),
        ('{"prompt": true, "response": "b"}\n', 1, "'prompt' must be a string"),
    ],
)
def test_read_jsonl_errors_name_file_and_line(tmp_path, text, line, fragment):
    p = _write(tmp_path / "bad.jsonl", text)
    with pytest.raises(DataError) as e:
        read_jsonl(p, ["prompt", "response"])
    msg = str(e.value)
    assert f"bad.jsonl:{line}:" in msg
    assert fragment in msg


def test_read_jsonl_typed_keys(tmp_path):
    p = _write(tmp_path / "t.jsonl", '{"n": 1, "x": 1.5}\n{"n": 2.5, "x": 1}\n')
    with pytest.raises(DataError, match=r"t.jsonl:2: key 'n' must be a integer"):
        read_jsonl(p, {"n": int, "x": (int, float)})


def test_read_jsonl_empty_and_missing(tmp_path):
    with pytest.raises(DataError, match="empty file"):
        read_jsonl(_write(tmp_path / "e.jsonl", "\n  \n"), ["prompt"])
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "nope.jsonl", ["prompt"])


def test_write_read_roundtrip_and_hashes(tmp_path):
    recs = [{"prompt": "copy apple", "response": "apple"}, {"prompt": "ü", "response": "x"}]
    p = tmp_path / "r.jsonl"
    write_jsonl(p, recs)
    assert read_jsonl(p, ["prompt", "response"]) == recs
    h = file_hash(p)
    assert len(h) == 64 and h == file_hash(p)
    # CRLF line ends hash like LF; any content change changes the hash
    crlf = tmp_path / "crlf.jsonl"
    crlf.write_bytes(p.read_bytes().replace(b"\n", b"\r\n"))
    assert file_hash(crlf) == h
    write_jsonl(p, recs[:1])
    assert file_hash(p) != h
    # records_hash ignores formatting and key order
    assert records_hash([{"a": 1, "b": 2}]) == records_hash([{"b": 2, "a": 1}])
    assert records_hash([{"a": 1}]) != records_hash([{"a": 2}])


def test_encode_example_uses_chat_template(tok):
    e = encode_example(tok, "next apple river", "river stone")
    ids, mask = e["input_ids"], e["response_mask"]
    assert len(ids) == len(mask)
    words = tok.convert_ids_to_tokens(ids)
    assert words == ["<bos>", "<user>", "next", "apple", "river", "<assistant>", "river", "stone", "<eos>"]
    assert mask == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    p = encode_example(tok, "next apple river")
    assert p["input_ids"] == ids[:6] and p["response_mask"] == [0] * 6


def test_fast_encoder_matches_chat_template(tok):
    from mergekit_safety.lab.language import FastEncoder

    enc = FastEncoder()
    for prompt, resp in [("copy bomb apple", "bomb apple"), ("twin a b c", "sorry i cannot help with that")]:
        e = encode_example(tok, prompt, resp)
        assert enc.example(prompt, resp) == (e["input_ids"], e["response_mask"])
        assert enc.prompt_ids(prompt) == encode_example(tok, prompt)["input_ids"]


def test_encode_example_plain_concatenation_without_template(tok):
    import copy

    plain = copy.deepcopy(tok)
    plain.chat_template = None
    e = encode_example(plain, "copy apple", "apple")
    assert plain.convert_ids_to_tokens(e["input_ids"]) == ["copy", "apple", "apple", "<eos>"]
    assert e["response_mask"] == [0, 0, 1, 1]


def test_encode_example_truncates_prompt_from_the_left_with_warning(tok):
    full = encode_example(tok, "copy apple river stone cloud", "apple river")
    with pytest.warns(TruncationWarning):
        e = encode_example(tok, "copy apple river stone cloud", "apple river", max_length=6)
    assert len(e["input_ids"]) == 6
    assert e["input_ids"] == full["input_ids"][-6:]  # the end of the prompt and the whole response
    assert e["response_mask"] == [0, 0, 0, 1, 1, 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_example(tok, "copy apple", "apple", max_length=64)  # no warning when it fits


def test_collate_and_batches(tok):
    enc = [encode_example(tok, "copy apple", "apple"), encode_example(tok, "copy apple river stone", "apple river stone")]
    b = collate(enc, pad_id=tok.pad_token_id)
    assert b["input_ids"].shape == (2, len(enc[1]["input_ids"]))
    assert b["attention_mask"][0].tolist() == [1] * len(enc[0]["input_ids"]) + [0] * 4
    assert b["input_ids"][0, -1].item() == tok.pad_token_id
    assert b["response_mask"][0].tolist() == enc[0]["response_mask"] + [0] * 4
    left = collate(enc, pad_id=tok.pad_token_id, padding_side="left")
    assert left["attention_mask"][0].tolist() == [0] * 4 + [1] * len(enc[0]["input_ids"])
    got = list(batches(enc * 3, batch_size=4, pad_id=tok.pad_token_id))
    assert [x["input_ids"].shape[0] for x in got] == [4, 2]
    with pytest.raises(ValueError):
        collate([{"input_ids": [1, 2], "response_mask": [0]}], pad_id=0)
