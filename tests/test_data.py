"""Data pipeline: mesh-invariant global batches, exact resume, inputs, tokenizers, errors.

Everything runs offline on small files; the embedded corpus is tokenized once per module.
"""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before `datasets` is imported anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gzip
import importlib.util
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from train.data import ByteTokenizer, TokenBatches, load_tokenizer, unigram_entropy_nats
from train.data_sources import templates_corpus_path
from train.tokenizer import HFTokenizer

ROOT = Path(__file__).resolve().parents[1]
SEQ, BATCH = 32, 8
BYTE = ByteTokenizer()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("token-cache")


def batches(cache, world, *, rank=None, dataset="templates", seq=SEQ, batch=BATCH, seed=0, tokenizer=BYTE, **kw):
    """One TokenBatches per rank (or only ``rank``)."""
    ranks = range(world) if rank is None else [rank]
    return [TokenBatches(dataset, tokenizer, seq, batch, r, world, seed, cache_dir=cache, **kw) for r in ranks]


def global_batch(ranks):
    """Next step's global batch: the ranks' rows concatenated in rank order."""
    parts = [next(r) for r in ranks]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def global_inputs(ranks, steps):
    return [global_batch(ranks)[0] for _ in range(steps)]


# ---------------------------------------------------------------- mesh invariance and resume


def test_global_batch_is_identical_for_batch_world_1_2_4(cache):
    reference = global_inputs(batches(cache, 1), 5)
    assert reference[0].shape == (BATCH, SEQ)
    assert not torch.equal(reference[0], reference[1])  # steps really advance
    for world in (2, 4):
        ranks = batches(cache, world)
        assert next(iter(ranks[0]))[0].shape == (BATCH // world, SEQ)
        ranks = batches(cache, world)  # fresh: the line above consumed a batch on rank 0
        got = global_inputs(ranks, 5)
        for step, (want, have) in enumerate(zip(reference, got)):
            assert torch.equal(want, have), f"batch_world={world} differs from 1 at step {step}"


def test_labels_are_inputs_shifted_by_one_inside_a_corpus_window(cache):
    inputs, labels = next(batches(cache, 1)[0])
    assert inputs.dtype == labels.dtype == torch.int64
    assert torch.equal(labels[:, :-1], inputs[:, 1:])
    corpus = templates_corpus_path().read_bytes()
    for row in range(BATCH):  # each row + its last label is a contiguous piece of the corpus
        window = bytes(inputs[row].tolist() + [int(labels[row, -1])])
        assert window in corpus


def test_resume_mid_epoch_gives_the_same_next_batches(cache):
    straight = batches(cache, 2)
    global_inputs(straight, 3)
    state = json.loads(json.dumps(straight[0].state_dict()))  # must survive JSON
    want = global_inputs(straight, 3)
    resumed = batches(cache, 2, seed=0)
    for r in resumed:
        r.load_state_dict(state)
    assert state["samples_consumed"] == 3 * BATCH
    assert all(torch.equal(a, b) for a, b in zip(want, global_inputs(resumed, 3)))


def test_resume_with_a_different_batch_world_continues_the_same_global_sequence(cache):
    reference = global_inputs(batches(cache, 1), 6)
    first = batches(cache, 4)
    assert all(torch.equal(a, b) for a, b in zip(reference[:2], global_inputs(first, 2)))
    state = first[3].state_dict()  # any rank's state is the global position
    second = batches(cache, 2)
    for r in second:
        r.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(reference[2:], global_inputs(second, 4)))


def test_epoch_wrap_around_is_deterministic_and_each_epoch_covers_every_window(tmp_path):
    data = tmp_path / "small.txt"
    data.write_text("abcdefghijklmnopqrstuvwxyz" * 5)  # 131 tokens with EOS -> 13 windows of 10
    a = batches(tmp_path / "c", 1, dataset=str(data), seq=10, batch=4)[0]
    assert a.num_windows == 12 and a.held_out_windows.tolist() == [12]  # the last window is held out
    rows = torch.cat([next(a)[0] for _ in range(12)])  # 48 samples: 4 epochs
    assert a.epoch == 4
    epochs = [rows[e * 12:(e + 1) * 12] for e in range(4)]
    starts = [sorted(e[:, 0].tolist()) for e in epochs]
    assert all(s == starts[0] for s in starts)  # every epoch is a permutation of the same windows
    assert not torch.equal(epochs[0], epochs[1])  # ... in a new order
    held_out = torch.from_numpy(a.window_tokens(12)[:-1].astype(np.int64))
    assert not any(torch.equal(row, held_out) for row in rows), "training read the held-out window"
    b = batches(tmp_path / "c", 2, dataset=str(data), seq=10, batch=4)
    assert torch.equal(rows, torch.cat(global_inputs(b, 12)))  # and the same order on any mesh
    other_seed = batches(tmp_path / "c", 1, dataset=str(data), seq=10, batch=4, seed=1)[0]
    assert not torch.equal(rows[:12], torch.cat([next(other_seed)[0] for _ in range(3)])[:12])


# ---------------------------------------------------------------- inputs and tokenizers


def all_tokens(data: TokenBatches) -> list[int]:
    """Every token of the cached token file behind ``data``."""
    return np.asarray(data.tokens).tolist()


def test_txt_jsonl_and_mixed_folder_inputs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("plain text file\n\nwith two paragraphs")
    (folder / "b.jsonl").write_text('{"text": "json line one", "id": 1}\n{"text": "json line two", "id": 2}\n')
    (folder / "sub" / "c.json").write_text(json.dumps([{"text": "json array doc"}]))
    pq.write_table(pa.table({"text": ["parquet doc"], "n": [3]}), folder / "sub" / "d.parquet")
    (folder / "ignored.md").write_text("not data")
    docs = ["plain text file\n\nwith two paragraphs", "json line one", "json line two", "json array doc", "parquet doc"]

    got = batches(tmp_path / "c", 1, dataset=str(folder), seq=4, batch=1)[0]
    want = [t for doc in docs for t in BYTE.encode(doc) + [BYTE.eos_id]]  # sorted paths, EOS after each doc
    assert all_tokens(got) == want
    jsonl = batches(tmp_path / "c", 1, dataset=str(folder / "b.jsonl"), seq=4, batch=1)[0]
    assert BYTE.decode(all_tokens(jsonl)) == "json line onejson line two"
    txt = batches(tmp_path / "c", 1, dataset=str(folder / "a.txt"), seq=4, batch=1)[0]
    assert all_tokens(txt) == BYTE.encode(docs[0]) + [BYTE.eos_id]


def test_text_column_is_configurable_and_a_missing_column_is_named(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"body": "hello there", "text": "wrong"}\n')
    got = batches(tmp_path / "c", 1, dataset=str(data), seq=4, batch=1, text_column="body")[0]
    assert BYTE.decode(all_tokens(got)) == "hello there"
    with pytest.raises(ValueError, match="content"):
        batches(tmp_path / "c", 1, dataset=str(data), seq=4, batch=1, text_column="content")


def make_tokenizer_json(folder: Path) -> Path:
    """A tiny word-level tokenizer built with the `tokenizers` library."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", "<|endoftext|>"])
    tok.train_from_iterator(["the fox saw the owl", "the owl ate mice"], trainer)
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return path


def test_tokenizer_json_path_loads_and_feeds_batches(tmp_path):
    path = make_tokenizer_json(tmp_path)
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer) and load_tokenizer(str(tmp_path)).fingerprint == tok.fingerprint
    assert tok.eos_id == 1 and tok.vocab_size == 8
    ids = tok.encode("the owl saw the fox")
    assert tok.decode(ids) == "the owl saw the fox" and tok.eos_id not in ids
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "the fox saw the owl " * 3}) + "\n" for _ in range(4)))
    inputs, labels = next(batches(tmp_path / "c", 2, dataset=str(data), seq=5, batch=4, tokenizer=tok)[1])
    assert inputs.shape == (2, 5) and int(inputs.max()) < tok.vocab_size
    assert tok.eos_id in all_tokens(batches(tmp_path / "c", 1, dataset=str(data), seq=5, batch=4, tokenizer=tok)[0])
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(str(tmp_path / "missing.json"))


def test_byte_tokenizer_round_trips_unicode():
    text = "Grüße, 世界 ✓"
    assert BYTE.decode(BYTE.encode(text) + [BYTE.eos_id]) == text
    assert isinstance(load_tokenizer("byte"), ByteTokenizer) and BYTE.vocab_size == 257


def test_cache_is_tokenized_once_when_ranks_start_together(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("some text to tokenize " * 50)
    calls = []

    class CountingTokenizer(ByteTokenizer):
        fingerprint = "counting"

        def encode(self, text):
            calls.append(text)
            return super().encode(text)

    tok, results = CountingTokenizer(), {}

    def start(rank):
        results[rank] = next(TokenBatches(str(data), tok, 16, 4, rank, 4, seed=0, cache_dir=tmp_path / "c"))[0]

    threads = [threading.Thread(target=start, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(calls) == 1 and len(results) == 4
    assert not list((tmp_path / "c").glob("*.tmp"))  # no leftovers of the atomic write


# ---------------------------------------------------------------- streaming and hub


def test_streaming_is_mesh_invariant_and_resumes_exactly(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"document number {i} " * (i % 3 + 1)}) + "\n" for i in range(30)))
    kw = dict(dataset=str(data), seq=8, batch=4, streaming=True, block_documents=8)
    reference = global_inputs(batches(tmp_path, 1, **kw), 40)  # several epochs of ~17 windows
    assert all(torch.equal(a, b) for a, b in zip(reference, global_inputs(batches(tmp_path, 2, **kw), 40)))
    first = batches(tmp_path, 4, **kw)
    global_inputs(first, 25)
    resumed = batches(tmp_path, 2, **kw)
    for r in resumed:
        r.load_state_dict(first[0].state_dict())
    assert all(torch.equal(a, b) for a, b in zip(reference[25:], global_inputs(resumed, 15)))
    cached = batches(tmp_path, 1, dataset=str(data), seq=8, batch=4)[0]
    with pytest.raises(ValueError, match="streaming"):
        cached.load_state_dict(first[0].state_dict())


class DocumentCountingTokenizer(ByteTokenizer):
    """Bytes, counting the documents it encodes."""

    def __init__(self):
        self.documents = 0

    def encode(self, text):
        self.documents += 1
        return super().encode(text)


def test_streaming_resume_restores_the_stream_position_instead_of_re_encoding(tmp_path):
    """A resumed stream tokenizes only the document it stopped in, not everything consumed before."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"doc {i}: a word"}) + "\n" for i in range(300)))
    kw = dict(dataset=str(data), seq=16, batch=4, streaming=True, block_documents=16)
    straight_tokenizer = DocumentCountingTokenizer()
    straight = batches(tmp_path, 1, tokenizer=straight_tokenizer, **kw)[0]
    reference = [next(straight)[0] for _ in range(60)]
    first_tokenizer, second_tokenizer = DocumentCountingTokenizer(), DocumentCountingTokenizer()
    first = batches(tmp_path, 1, tokenizer=first_tokenizer, **kw)[0]
    for _ in range(50):
        next(first)
    assert first_tokenizer.documents > 100  # deep into the stream: ~15 bytes a document, 16 a window
    resumed = batches(tmp_path, 1, tokenizer=second_tokenizer, **kw)[0]
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as it travels in a checkpoint
    assert all(torch.equal(next(resumed)[0], want) for want in reference[50:])
    # the 10 batches' own documents, plus the one the first run stopped in; replaying would add 100+
    new_documents = straight_tokenizer.documents - first_tokenizer.documents
    assert second_tokenizer.documents <= new_documents + 1, (second_tokenizer.documents, new_documents)


def test_a_prepared_dataset_is_tokenized_in_worker_processes_to_the_same_cache(tmp_path, monkeypatch):
    """A map-style datasets.Dataset (a downloaded hub dataset) goes through Dataset.map(num_proc=...);
    the token file is the same as the one-pass reader's, document for document."""
    import datasets

    from train import data_sources

    texts = [f"document {i}: " + "words " * (i % 7) for i in range(300)]
    table = datasets.Dataset.from_dict({"text": texts, "other": list(range(300))})
    source = data_sources.Source("table", "table-v1", "text", lambda epoch: table)
    tokenizer = load_tokenizer("default")
    serial, serial_meta = data_sources.load_token_cache(source, tokenizer, tmp_path / "serial")
    monkeypatch.setattr(data_sources, "PARALLEL_MIN_DOCUMENTS", 100)
    calls = []
    original_map = datasets.Dataset.map
    monkeypatch.setattr(datasets.Dataset, "map", lambda self, *a, **kw: calls.append(kw["num_proc"]) or
                        original_map(self, *a, **kw))
    parallel, parallel_meta = data_sources.load_token_cache(source, tokenizer, tmp_path / "parallel")
    assert calls == [min(os.cpu_count(), 16)] and calls[0] > 1
    assert np.array_equal(np.asarray(serial), np.asarray(parallel)) and parallel_meta["n_documents"] == 300
    assert serial_meta["sha256"] == parallel_meta["sha256"]


def test_hub_config_split_and_text_column_reach_load_dataset(tmp_path, monkeypatch):
    """--dataset-config, --dataset-split and --text-column, against a stand-in for the hub."""
    import datasets

    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return datasets.Dataset.from_dict({"body": ["first text", "second text"], "id": [1, 2]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data = TokenBatches("org/corpus", BYTE, 4, 2, 0, 1, 0, cache_dir=tmp_path, text_column="body",
                        hub_config="en", split="validation")
    assert calls == [("org/corpus", "en", "validation", False)] and data.n_documents == 2
    assert data.description == "hub:org/corpus (en) [validation]"
    with pytest.raises(ValueError, match=r"no column 'text' \(columns: \['body', 'id'\]\); pass --text-column"):
        TokenBatches("org/corpus", BYTE, 4, 2, 0, 1, 0, cache_dir=tmp_path)


def test_unreachable_hub_dataset_gives_a_clear_error(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(ValueError, match="local .txt/.jsonl"):
        TokenBatches("meshtron-nonexistent/no-such-dataset", BYTE, 8, 2, 0, 1, 0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        TokenBatches("./no/such/file.jsonl", BYTE, 8, 2, 0, 1, 0, cache_dir=tmp_path)


# ---------------------------------------------------------------- errors


def test_bad_shapes_fail_early_with_the_fix(cache, tmp_path):
    with pytest.raises(ValueError, match=r"global_batch_size=6 is not divisible by batch_world=4.*e\.g\. 4 or 8"):
        TokenBatches("templates", BYTE, SEQ, 6, 0, 4, 0, cache_dir=cache)
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        TokenBatches("templates", BYTE, 0, 8, 0, 1, 0, cache_dir=cache)
    with pytest.raises(ValueError, match="batch_rank=2"):
        TokenBatches("templates", BYTE, SEQ, 8, 2, 2, 0, cache_dir=cache)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("short")
    with pytest.raises(ValueError, match="seq_len \\+ 1 = 33"):
        TokenBatches(str(tiny), BYTE, SEQ, 8, 0, 1, 0, cache_dir=cache)


def test_state_from_another_seed_or_seq_len_is_refused(cache):
    state = batches(cache, 1)[0].state_dict()
    with pytest.raises(ValueError, match="seed=0"):
        batches(cache, 1, seed=1)[0].load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len=32"):
        batches(cache, 1, seq=16)[0].load_state_dict(state)


# ---------------------------------------------------------------- embedded corpus


def test_template_corpus_is_the_generator_output_and_its_entropy_is_known():
    path = templates_corpus_path()
    spec = importlib.util.spec_from_file_location("make_templates", ROOT / "tools" / "corpus" / "make_templates.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert path.read_text(encoding="utf-8") == module.generate()
    assert 200_000 < path.stat().st_size < 1_000_000
    entropy = unigram_entropy_nats(path)
    assert abs(entropy - 3.062) < 0.01
    assert abs(unigram_entropy_nats(BYTE.encode("abab")) - np.log(2)) < 1e-12


def test_state_follows_the_tokens_not_the_file(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("the same words again " * 20)
    b.write_bytes(a.read_bytes())  # a copy: new path and cache key, same tokens
    first = batches(tmp_path / "c", 1, dataset=str(a), seq=8, batch=2)[0]
    next(first)
    copy = batches(tmp_path / "c", 1, dataset=str(b), seq=8, batch=2)[0]
    copy.load_state_dict(first.state_dict())
    assert torch.equal(next(copy)[0], next(first)[0])
    b.write_text("different words now " * 20)
    with pytest.raises(ValueError, match="fingerprint"):
        batches(tmp_path / "c", 1, dataset=str(b), seq=8, batch=2)[0].load_state_dict(first.state_dict())


def test_default_corpus_is_shakespeare_one_document_per_scene_with_the_bundled_bpe(tmp_path):
    """--dataset default (= shakespeare): 934 documents (scenes, sonnets, poems), each ended by one EOS,
    tokenized by the bundled 4096-token BPE, which round-trips the text."""
    tokenizer = load_tokenizer("default")
    phrase = "Ünïcödé, thou art"
    assert tokenizer.vocab_size == 4096 and tokenizer.decode(tokenizer.encode(phrase)) == phrase
    data = TokenBatches("default", tokenizer, 128, 4, 0, 1, seed=0, cache_dir=tmp_path)
    tokens = np.asarray(data.tokens)
    assert data.n_documents == 934 and (tokens == tokenizer.eos_id).sum() == 934
    assert 1_500_000 < len(tokens) < 1_800_000  # ~3.3 characters per token on 5.4 MB of text
    assert len(data.held_out_windows) == (len(tokens) - 1) // 128 // 100  # 1% held out for evaluation
    first_scene = tokenizer.decode(tokens[:int(np.argmax(tokens == tokenizer.eos_id))].tolist())
    assert first_scene.startswith("All's Well That Ends Well")
    assert "Shall I compare thee to a summer's day?" in tokenizer.decode(tokens.tolist())
    assert np.array_equal(np.asarray(TokenBatches("shakespeare", tokenizer, 128, 4, 0, 1, seed=0,
                                                  cache_dir=tmp_path).tokens), tokens)


def test_a_gzipped_jsonl_file_is_read_like_the_plain_one(tmp_path):
    records = "".join(json.dumps({"body": f"record {i} " * 5}) + "\n" for i in range(6))
    (tmp_path / "a.jsonl").write_text(records)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as out:
        out.write(records)
    plain, packed = (TokenBatches(str(tmp_path / name), BYTE, 8, 2, 0, 1, 0, cache_dir=tmp_path / "c",
                                  text_column="body") for name in ("a.jsonl", "b.jsonl.gz"))
    assert np.array_equal(np.asarray(plain.tokens), np.asarray(packed.tokens)) and plain.n_documents == 6
