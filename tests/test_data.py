import json

import numpy as np
import pytest

from algpt2_tf.losses import IGNORE_INDEX
from algpt2_tf.tokenizer import GPT2Tokenizer
from algpt2_tf.training import data


@pytest.fixture(scope="module")
def tokenizer():
    return GPT2Tokenizer()


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_prepare_caches_and_reuses(tmp_path, tokenizer):
    a = write(tmp_path / "a.txt", "First document.")
    write(tmp_path / "b.jsonl", json.dumps({"text": "Second."}) + "\n\n" + json.dumps({"text": "Third."}) + "\n")
    cache = tmp_path / "cache"
    meta = data.prepare_corpus([str(tmp_path / "*.txt"), str(tmp_path / "*.jsonl")], str(cache), tokenizer)
    assert meta["documents"] == 3
    stream = data.load_split(str(cache))
    eos = tokenizer.eos_id
    expected = (tokenizer.encode("First document.") + [eos] + tokenizer.encode("Second.") + [eos]
                + tokenizer.encode("Third.") + [eos])
    assert stream.tolist() == expected
    assert data.load_document_offsets(str(cache)).tolist() == [0, 4, 7]
    # Reused while nothing changed; rebuilt when a file changes.
    mtime = (cache / "train.npy").stat().st_mtime_ns
    data.prepare_corpus([str(tmp_path / "*.txt"), str(tmp_path / "*.jsonl")], str(cache), tokenizer)
    assert (cache / "train.npy").stat().st_mtime_ns == mtime
    write(tmp_path / "a.txt", "Changed document, longer.")
    meta = data.prepare_corpus([a, str(tmp_path / "*.jsonl")], str(cache), tokenizer)
    assert data.load_split(str(cache))[:5].tolist() == tokenizer.encode("Changed document, longer.")[:5]


def test_valid_fraction_holds_out_the_tail(tmp_path, tokenizer):
    write(tmp_path / "a.txt", "word " * 1000)
    meta = data.prepare_corpus(str(tmp_path / "a.txt"), str(tmp_path / "c"), tokenizer, valid_fraction=0.1)
    assert meta["valid_tokens"] == round(0.1 * (meta["train_tokens"] + meta["valid_tokens"]))
    assert len(data.load_split(str(tmp_path / "c"), "valid")) == meta["valid_tokens"]


def test_bad_corpora_raise_clear_errors(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="nothing"):
        data.prepare_corpus(str(tmp_path / "nothing*.txt"), str(tmp_path / "c"), tokenizer)
    write(tmp_path / "empty.txt", "  \n")
    with pytest.raises(ValueError, match="empty"):
        data.prepare_corpus(str(tmp_path / "empty.txt"), str(tmp_path / "c"), tokenizer)
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe bad")
    with pytest.raises(ValueError, match=r"bad.txt is not valid UTF-8 \(byte 3"):
        data.prepare_corpus(str(tmp_path / "bad.txt"), str(tmp_path / "c"), tokenizer)
    write(tmp_path / "x.jsonl", '{"body": "no text"}\n')
    with pytest.raises(ValueError, match="x.jsonl:1: no string field 'text'"):
        data.prepare_corpus(str(tmp_path / "x.jsonl"), str(tmp_path / "c"), tokenizer)
    with pytest.raises(ValueError, match="fewer than one batch"):
        data.lm_dataset(np.arange(100), seq_len=64, batch_size=4)


def batches(ds):
    return [{k: v.numpy() for k, v in b.items()} for b in ds]


def test_lm_dataset_is_deterministic_resumable_and_covers_each_epoch():
    tokens = np.arange(10 * 8, dtype=np.int32)
    full = batches(data.lm_dataset(tokens, seq_len=8, batch_size=2, seed=3, num_steps=10))
    assert all(b["input_ids"].shape == (2, 8) for b in full)
    # Each epoch (5 batches) visits every block once.
    first = np.concatenate([b["input_ids"][:, 0] for b in full[:5]])
    assert sorted(first.tolist()) == list(range(0, 80, 8))
    second = np.concatenate([b["input_ids"][:, 0] for b in full[5:]])
    assert sorted(second.tolist()) == list(range(0, 80, 8)) and not np.array_equal(first, second)
    # Resuming at step 7 gives exactly batches 7.. of the full run.
    resumed = batches(data.lm_dataset(tokens, seq_len=8, batch_size=2, seed=3, start_step=7, num_steps=3))
    for a, b in zip(resumed, full[7:]):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    other = batches(data.lm_dataset(tokens, seq_len=8, batch_size=2, seed=4, num_steps=5))
    assert any(not np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(other, full))


def test_sop_pairs_are_consecutive_and_swapped_pairs_get_no_cross_order_lm_loss():
    # Two documents of 40 and 24 tokens; ids encode (document, position).
    tokens = np.concatenate([1000 + np.arange(40), 2000 + np.arange(24)]).astype(np.int32)
    offsets = np.array([0, 40])
    starts = data.sop_pair_starts(offsets, len(tokens), 8)
    assert starts.tolist() == [0, 8, 16, 24, 32, 40, 48, 56]
    out = batches(data.sop_dataset(tokens, offsets, seq_len=8, batch_size=4, seed=0, num_steps=20))
    labels_seen = set()
    for b in out:
        for ids, labels, sop in zip(b["input_ids"], b["labels"], b["sop_labels"]):
            labels_seen.add(int(sop))
            a, c = ids[:4], ids[4:]
            assert len({x // 1000 for x in ids}) == 1  # one document
            if sop == 0:
                np.testing.assert_array_equal(np.diff(ids), 1)
                assert labels[:-1].tolist() == ids[1:].tolist() and labels[-1] == IGNORE_INDEX
            else:
                np.testing.assert_array_equal(c + 4, a)  # B then A
                # LM targets only inside the first segment (B predicting B).
                assert labels[:3].tolist() == ids[1:4].tolist()
                assert (labels[3:] == IGNORE_INDEX).all()
    assert labels_seen == {0, 1}
    again = batches(data.sop_dataset(tokens, offsets, seq_len=8, batch_size=4, seed=0, start_step=5, num_steps=1))
    np.testing.assert_array_equal(again[0]["input_ids"], out[5]["input_ids"])
    np.testing.assert_array_equal(again[0]["sop_labels"], out[5]["sop_labels"])
