"""The loader: disjoint ranks, deterministic, world-size independent, exactly resumable."""
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from workloads import WORKLOADS, ShardedLoader, split_micro
from workloads.gpt import TokenWindows


class Range:
    """A source whose sample i is just i, to see which samples a rank gets."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def gather(self, idx):
        return (torch.as_tensor(np.asarray(idx)),)


def _take(loader, steps):
    return [loader.next_batch()[0].tolist() for _ in range(steps)]


def test_ranks_are_disjoint_and_cover_the_global_batch():
    world, gb = 4, 16
    per_rank = [_take(ShardedLoader(Range(100), rank=r, world=world, global_batch=gb, seed=1), 6) for r in range(world)]
    reference = _take(ShardedLoader(Range(100), rank=0, world=1, global_batch=gb, seed=1), 6)
    for step in range(6):
        slices = [set(per_rank[r][step]) for r in range(world)]
        assert sum(map(len, slices)) == gb
        assert set().union(*slices) == set(reference[step])  # same global batch as a 1-rank run
        for a in range(world):
            for b in range(a + 1, world):
                assert not slices[a] & slices[b]


def test_deterministic_and_seed_dependent():
    a = _take(ShardedLoader(Range(50), rank=0, world=2, global_batch=8, seed=7), 10)
    b = _take(ShardedLoader(Range(50), rank=0, world=2, global_batch=8, seed=7), 10)
    c = _take(ShardedLoader(Range(50), rank=0, world=2, global_batch=8, seed=8), 10)
    assert a == b and a != c


def test_epoch_visits_every_sample_once_and_drops_the_ragged_tail():
    loader = ShardedLoader(Range(50), rank=0, world=1, global_batch=8, seed=0)
    seen = sum(_take(loader, 6), [])  # 6 x 8 = 48 of 50 samples
    assert len(set(seen)) == 48
    loader.next_batch()  # the 2 left over cannot make a batch: next epoch
    assert loader.cursor.epoch == 1 and loader.cursor.position == 8


def test_cursor_restore_resumes_at_the_exact_next_sample():
    full = ShardedLoader(Range(30), rank=1, world=2, global_batch=6, seed=3)
    expected = _take(full, 12)  # crosses two epoch boundaries
    first = ShardedLoader(Range(30), rank=1, world=2, global_batch=6, seed=3)
    head = _take(first, 7)
    resumed = ShardedLoader(Range(30), rank=1, world=2, global_batch=6, seed=3)
    resumed.load_state_dict(first.state_dict())
    assert head + _take(resumed, 5) == expected


def test_cursor_survives_a_change_of_world_size():
    """A cursor saved at 4 ranks resumes at 2 ranks on the same global samples."""
    four = [ShardedLoader(Range(64), rank=r, world=4, global_batch=8, seed=5) for r in range(4)]
    for loader in four:
        _take(loader, 3)
    two = [ShardedLoader(Range(64), rank=r, world=2, global_batch=8, seed=5) for r in range(2)]
    for loader in two:
        loader.load_state_dict(four[0].state_dict())
    nxt4 = sorted(sum((lo.next_batch()[0].tolist() for lo in four), []))
    nxt2 = sorted(sum((lo.next_batch()[0].tolist() for lo in two), []))
    assert nxt4 == nxt2


def test_bad_loader_arguments():
    with pytest.raises(ValueError, match=r"global_batch\(10\) is not divisible by world\(4\)"):
        ShardedLoader(Range(100), rank=0, world=4, global_batch=10, seed=0)
    with pytest.raises(ValueError, match=r"larger than the dataset \(5 samples\)"):
        ShardedLoader(Range(5), rank=0, world=1, global_batch=8, seed=0)
    with pytest.raises(ValueError, match="cannot be split into 3"):
        split_micro((torch.zeros(8, 2),), 3)


def test_gpt_tiny_corpus_is_deterministic_and_structured():
    w = WORKLOADS.get("gpt-tiny")()
    a, b = w.source(), w.source()
    assert len(a) > 5000 and torch.equal(a.windows, b.windows)
    x, y = a.gather(np.arange(4))
    assert x.shape == (4, 128) and torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    # structure: a few dozen distinct bytes, far from uniform over 256
    assert len(torch.unique(a.windows)) < 40


def test_user_shards_with_variable_length_rows(tmp_path):
    rows = [list(range(i, i + n)) for i, n in [(0, 50), (10, 90), (3, 30)]]
    pq.write_table(pa.table({"tokens": rows, "other": [1, 2, 3]}), tmp_path / "part-0.parquet")
    src = TokenWindows(str(tmp_path), seq_len=16, vocab=256)
    stream = sum(rows, [])
    assert len(src) == len(stream) // 17
    x, y = src.gather(np.array([1]))
    assert x[0].tolist() == stream[17:33] and y[0].tolist() == stream[18:34]


def test_shards_of_every_list_kind_read_in_file_order_across_row_groups(tmp_path):
    from workloads.data import read_column

    pq.write_table(pa.table({"t": pa.array([[1, 2], [3]], type=pa.large_list(pa.int16()))}), tmp_path / "b.parquet")
    pq.write_table(pa.table({"t": pa.array([[4, 5], [6, 7]], type=pa.list_(pa.uint8(), 2))}), tmp_path / "c.parquet")
    pq.write_table(pa.table({"t": list(range(8, 20))}), tmp_path / "d.parquet", row_group_size=5)
    pq.write_table(pa.table({"t": [[-2], [-1, 0]]}), tmp_path / "a.parquet")
    assert read_column(str(tmp_path), "t").tolist() == list(range(-2, 20))


def test_reading_a_column_imports_no_pandas(tmp_path):
    """pyarrow's conversions import pandas: 0.45 s of CPU in every rank that reads its data."""
    import subprocess
    import sys

    pq.write_table(pa.table({"tokens": [list(range(100))]}), tmp_path / "a.parquet")
    code = (f"import sys; from workloads.gpt import TokenWindows; TokenWindows({str(tmp_path)!r}, 9, 256); "
            "print('pandas' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_user_shards_through_memory_url():
    import fsspec

    fs = fsspec.filesystem("memory")
    with fs.open("/polytrain-test/shards/a.parquet", "wb") as f:
        pq.write_table(pa.table({"tokens": [list(range(100))]}), f)
    assert len(TokenWindows("memory://polytrain-test/shards", seq_len=9, vocab=256)) == 10


@pytest.mark.parametrize("table, message", [
    (pa.table({"ids": [[1, 2, 3]]}), r"no 'tokens' column \(columns: ids\)"),
    (pa.table({"tokens": [[1, 2, 300]]}), r"token ids must lie in \[0, 256\) for vocab_size=256, found \[1, 300\]"),
    (pa.table({"tokens": [[1, 2, 3]]}), "fewer than one window"),
    (pa.table({"tokens": [[1, None, 3] * 20]}), r"column 'tokens': 20 missing values"),
    (pa.table({"tokens": [["a", "b"] * 20]}), r"column 'tokens': holds list<element: string>; expected numbers"),
])
def test_bad_user_shards(tmp_path, table, message):
    pq.write_table(table, tmp_path / "x.parquet")
    with pytest.raises(ValueError, match=message):
        TokenWindows(str(tmp_path), seq_len=16, vocab=256)


def test_the_shipped_corpus_is_real_text_checked_by_hash(tmp_path, monkeypatch):
    import hashlib

    import workloads.corpora as corpora
    from workloads.gpt import GptTiny

    docs = corpora.load_corpus("python-stdlib")
    assert len(docs) == 168 and sum(map(len, docs)) == 4_698_388
    assert docs[0].startswith(b'"""Record of phased-in incompatible language changes.')
    windows = GptTiny(corpus="python-stdlib", seq_len=128).source()
    assert len(windows) == 4_698_388 // 129  # every byte of every document, in windows of seq_len + 1
    x, y = windows.gather(np.array([0]))
    assert bytes(x[0, :3].tolist()) == b'"""' and torch.equal(x[0, 1:], y[0, :-1])
    # a damaged copy is refused on one line, naming the corpus
    monkeypatch.setitem(corpora.CORPORA, "python-stdlib", corpora.Corpus(
        file="python-stdlib.xz", sha256=hashlib.sha256(b"other").hexdigest(), description=""))
    with pytest.raises(ValueError, match=r"^corpus='python-stdlib': sha256 d9089d31f07c\.\.\. of the shipped file"):
        corpora.load_corpus("python-stdlib")
    with pytest.raises(ValueError, match="vocab_size=128: corpus='python-stdlib' is bytes"):
        GptTiny(corpus="python-stdlib", vocab_size=128)


@pytest.mark.parametrize("name", ["gpt-tiny", "mlp-wide", "resnet-tiny"])
def test_builtin_workloads_hold_out_a_tail_no_training_sample_comes_from(name):
    workload = WORKLOADS.get(name)()
    full = workload.source()
    train, heldout = workload.train_source(full), workload.heldout_source(full)
    n = len(full)
    assert len(train) + len(heldout) == n and len(heldout) == round(0.05 * n)
    torch.testing.assert_close(heldout.gather(np.array([0])), full.gather(np.array([len(train)])))
    loader = ShardedLoader(train, rank=0, world=1, global_batch=len(train) // 2, seed=0)
    seen = np.concatenate([loader.next_global_indices() for _ in range(6)])  # three epochs
    assert seen.max() < len(train)  # the loader's indices never reach the held-out tail
    with pytest.raises(IndexError):
        train.gather(np.array([len(train)]))


def test_a_workload_without_heldout_data_says_so():
    from workloads.data import heldout_split

    workload = WORKLOADS.get("gpt-tiny")(heldout_fraction=0.0)
    assert workload.heldout_source() is None and len(workload.train_source()) == len(workload.source())
    assert heldout_split(10, 0.01) == 9 and heldout_split(1, 0.4) == 1 and heldout_split(10, 0.0) == 10
