import functools
import http.server
import threading

import pytest
import torch

from charlm import data, paths
from charlm.config import DataConfig
from charlm.data import Batcher, CharVocab, DataError, load_corpus, resolve_corpus


@pytest.fixture
def no_checkout_copy(tmp_path, monkeypatch):
    """Pretend the checkout has no data/ copy, so resolution must go further."""
    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path / "checkout")
    return tmp_path / "checkout"


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_explicit_path_must_exist(tmp_path):
    with pytest.raises(DataError, match="Data file not found: nope.txt"):
        resolve_corpus("nope.txt")
    f = tmp_path / "t.txt"
    f.write_text("hello")
    assert resolve_corpus(str(f)) == f


def test_checkout_copy_comes_first(no_checkout_copy, monkeypatch):
    (no_checkout_copy / "data").mkdir(parents=True)
    local = no_checkout_copy / "data" / data.DEFAULT_NAME
    local.write_text("x")
    monkeypatch.setenv("CHARLM_DATA_MIRROR", "/nonexistent")
    assert resolve_corpus() == local


def test_mirror_is_used_when_checksum_matches(no_checkout_copy, shakespeare, monkeypatch):
    monkeypatch.setenv("CHARLM_DATA_MIRROR", str(shakespeare.parent))
    assert resolve_corpus() == shakespeare


def test_download_verifies_checksum(no_checkout_copy, shakespeare, http_server, monkeypatch, tmp_path):
    www, url = http_server
    (www / "good.txt").write_bytes(shakespeare.read_bytes())
    (www / "bad.txt").write_text("not shakespeare")
    monkeypatch.delenv("CHARLM_DATA_MIRROR", raising=False)

    monkeypatch.setenv("CHARLM_DATA_URL", f"{url}/bad.txt")
    with pytest.raises(DataError) as e:
        resolve_corpus()
    msg = str(e.value)
    assert "checksum mismatch" in msg and "CHARLM_DATA_MIRROR" in msg and "data/tinyshakespeare.txt" in msg
    assert not (no_checkout_copy / "data" / data.DEFAULT_NAME).exists()  # nothing half-written kept

    monkeypatch.setenv("CHARLM_DATA_URL", f"{url}/good.txt")
    got = resolve_corpus()
    assert got == no_checkout_copy / "data" / data.DEFAULT_NAME
    assert data.sha256_file(got) == data.DEFAULT_SHA256


def test_all_three_ways_named_when_everything_fails(no_checkout_copy, monkeypatch):
    monkeypatch.setenv("CHARLM_DATA_MIRROR", str(no_checkout_copy / "empty"))
    monkeypatch.setenv("CHARLM_DATA_URL", "http://127.0.0.1:9/none")  # discard port: refused
    with pytest.raises(DataError) as e:
        resolve_corpus()
    msg = str(e.value)
    assert "\n" not in msg
    for way in ("data/tinyshakespeare.txt", "CHARLM_DATA_MIRROR", "download from http://127.0.0.1:9/none"):
        assert way in msg


def test_splits_are_contiguous_80_10_10_and_match_nanogpt_val(shakespeare):
    c = load_corpus(DataConfig())
    n = len(c.data)
    assert n == 1_115_394 and len(c.vocab) == 65
    assert c.sha256 == data.DEFAULT_SHA256
    assert (len(c.train), len(c.val), len(c.test)) == (int(n * 0.8), int(n * 0.9) - int(n * 0.8), n - int(n * 0.9))
    assert torch.equal(torch.cat([c.train, c.val, c.test]), c.data)
    text = shakespeare.read_text(encoding="utf-8")
    assert c.vocab.decode(c.test.tolist()) == text[int(n * 0.9):]  # nanoGPT's val split
    s, e = c.split_bounds("val")
    assert c.vocab.decode(c.val.tolist()) == text[s:e]


def test_vocab_round_trip_and_unknown_characters():
    v = CharVocab.from_text("hello world")
    assert v.decode(v.encode("hold").tolist()) == "hold"
    with pytest.raises(DataError) as e:
        v.encode("hello, world!")
    assert "2 character(s) not in the model's vocabulary: '!', ','" in str(e.value)
    assert v.decode(v.encode("hello, world!", skip_unknown=True).tolist()) == "hello world"
    assert CharVocab(v.to_list()) == v


def test_bad_texts(tmp_path):
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"abc\xff\xfe")
    with pytest.raises(DataError, match="not UTF-8 text"):
        load_corpus(DataConfig(path=str(binary)))
    empty = tmp_path / "e.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_corpus(DataConfig(path=str(empty)))
    short = tmp_path / "s.txt"
    short.write_text("a few words only")
    with pytest.raises(DataError, match="too short for data.context=128"):
        load_corpus(DataConfig(path=str(short)))


def test_batches_are_shifted_windows_of_the_split():
    d = torch.arange(100, dtype=torch.uint8)
    b = Batcher(d, length=8, batch_size=5, seed=0)
    x, y = b.next()
    assert x.shape == y.shape == (5, 8)
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(5, 7, dtype=torch.long))  # contiguous
    x2, _ = Batcher(d, length=8, batch_size=5, seed=0).next()
    assert torch.equal(x, x2)  # the seed fixes the batch order
