"""Tests for torch_impl/data/corpus.py: the stdlib default corpus, user paths, and the errors."""

import pytest

from torch_impl.data.corpus import CorpusError, iter_documents, load_corpus, stdlib_paths

SMALL = 300_000  # bytes: enough for dozens of stdlib files, read in milliseconds


def test_default_corpus_is_nonempty_and_deterministic():
    a = load_corpus(max_bytes=SMALL)
    b = load_corpus(max_bytes=SMALL)
    assert len(a) > 5 and all(d.strip() for d in a)
    assert a == b


def test_stdlib_walk_skips_tests_and_site_packages():
    parts = {part for p in stdlib_paths() for part in p.parts}
    assert not parts & {"site-packages", "test", "tests"}
    assert len(stdlib_paths()) > 100


@pytest.mark.parametrize("max_bytes", [1, 1000, 123_457])
def test_max_bytes_is_respected(max_bytes):
    docs = load_corpus(max_bytes=max_bytes) if max_bytes > 1 else list(iter_documents(max_bytes=max_bytes))
    total = sum(len(d.encode("utf-8")) for d in docs)
    assert total <= max_bytes
    if max_bytes > 1000:
        assert total > max_bytes - 4  # only a cut multi-byte character can be lost


def test_max_bytes_cut_is_a_prefix_of_the_full_corpus():
    small = load_corpus(max_bytes=50_000)
    full = load_corpus(max_bytes=200_000)
    assert small[:-1] == full[: len(small) - 1]
    assert full[len(small) - 1].startswith(small[-1])


def test_text_files_and_directories(tmp_path):
    (tmp_path / "b.md").write_text("second ü")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.py").write_text("third = 3\n")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "empty.txt").write_text("   \n")
    (tmp_path / ".hidden").write_bytes(b"\x00\x01 ignored")
    assert load_corpus([tmp_path]) == ["first", "second ü", "third = 3\n"]
    # files and directories can be mixed; order follows the arguments
    assert load_corpus([tmp_path / "sub", tmp_path / "a.txt"]) == ["third = 3\n", "first"]
    # a lone path works as well as a list of one
    assert load_corpus(str(tmp_path / "a.txt")) == ["first"]


def test_missing_path_error_names_the_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(CorpusError, match="nope.txt"):
        load_corpus([missing])


def test_binary_file_errors(tmp_path):
    nul = tmp_path / "image.bin"
    nul.write_bytes(b"GIF89a\x00\x00\x01")
    with pytest.raises(CorpusError, match="image.bin.*binary"):
        load_corpus([nul])
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CorpusError, match="latin1.txt.*UTF-8"):
        load_corpus([latin])
    # inside a directory too: the error names the offending file, not the directory
    with pytest.raises(CorpusError, match="image.bin"):
        load_corpus([tmp_path])


def test_empty_corpus_errors(tmp_path):
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(CorpusError, match="empty"):
        load_corpus([tmp_path / "blank.txt"])
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(CorpusError, match="emptydir.*empty"):
        load_corpus([tmp_path / "emptydir"])
    with pytest.raises(CorpusError, match="empty"):
        load_corpus([])


def test_parquet_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    good = tmp_path / "shard.parquet"
    pq.write_table(pa.table({"text": ["doc one", None, "doc two"], "id": [1, 2, 3]}), good)
    assert load_corpus([good]) == ["doc one", "doc two"]
    bad = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"content": ["x"]}), bad)
    with pytest.raises(CorpusError, match="nocol.parquet.*'text' column"):
        load_corpus([bad])
