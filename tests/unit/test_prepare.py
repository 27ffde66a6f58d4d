import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clsjob import store
from clsjob.config import InputConfig, StorageConfig
from clsjob.contract import CLEANED, GOLD, PART, PART_ROWS, part_name
from clsjob.run.prepare import check_schema, needed_columns, prepare_chunk
from clsjob.task import MULTI_LABEL

LOCAL = StorageConfig()


def test_a_shard_is_read_as_blocks_of_whole_parts(tmp_path):
    """parts_per_call chunks go on as one block (one back-end call), each keeping its own part
    name and row count, so the writer splits the block back into the same parts."""
    from clsjob.run.stages import read_chunks
    from clsjob.task import SINGLE_LABEL

    pq.write_table(pa.table({"text": [f"row {i}" for i in range(10)]}), tmp_path / "s.parquet")
    shard = pa.table({"path": [str(tmp_path / "s.parquet")], "key": ["s.parquet"]})
    cfg = InputConfig(path=str(tmp_path))
    one = list(read_chunks(shard, cfg, 3, 1, LOCAL, SINGLE_LABEL))
    blocks = list(read_chunks(shard, cfg, 3, 2, LOCAL, SINGLE_LABEL))
    assert [b.num_rows for b in one] == [3, 3, 3, 1]
    assert [b.num_rows for b in blocks] == [6, 4]
    assert [sorted(set(b.column(PART).to_pylist())) for b in blocks] == [
        [part_name("s.parquet", 0), part_name("s.parquet", 3)],
        [part_name("s.parquet", 6), part_name("s.parquet", 9)]]
    assert pa.concat_tables(blocks).equals(pa.concat_tables(one))
    assert pa.concat_tables(blocks).column(PART_ROWS).to_pylist() == [3] * 9 + [1]


def test_derived_ids_follow_shard_and_row_position():
    cfg = InputConfig(path="x")
    table = pa.table({"text": ["a", "b", "c"]})
    out = prepare_chunk(table, "day=1/part-7.parquet", 200, cfg)
    assert out.column("id").to_pylist() == ["day=1/part-7.parquet:200", "day=1/part-7.parquet:201",
                                            "day=1/part-7.parquet:202"]
    # Same shard and position -> same id, whatever the chunk boundaries were.
    again = prepare_chunk(table.slice(1), "day=1/part-7.parquet", 201, cfg)
    assert again.column("id").to_pylist() == out.column("id").to_pylist()[1:]


def test_given_ids_and_gold_and_carried_columns_are_kept():
    cfg = InputConfig(path="x", id_column="doc", label_column="label", carry_columns=["lang"])
    table = pa.table({"doc": [10, 11], "text": ["a", "b"], "label": ["x", None], "lang": ["en", "fr"]})
    out = prepare_chunk(table, "s.parquet", 0, cfg)
    assert out.column("doc").to_pylist() == [10, 11]
    assert out.column(GOLD).to_pylist() == ["x", None]
    assert out.column("lang").to_pylist() == ["en", "fr"]
    assert out.column(PART).to_pylist() == ["s-0000000000.parquet"] * 2
    assert out.column(PART_ROWS).to_pylist() == [2, 2]


def test_bad_text_rows_are_marked_not_dropped():
    cfg = InputConfig(path="x")
    out = prepare_chunk(pa.table({"text": ["ok", None, "", " \t\n", "  x "]}), "s", 0, cfg)
    assert out.num_rows == 5
    assert out.column("error").to_pylist() == [None, "text is null", "text is empty",
                                               "text is empty", None]


def test_needed_columns_only_and_in_order():
    cfg = InputConfig(path="x", id_column="i", label_column="y", carry_columns=["a", "i"])
    assert needed_columns(cfg) == ["i", "text", "y", "a"]


def shard_info(tmp_path, table: pa.Table) -> store.ShardInfo:
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)
    return store.inspect_shards([str(path)], LOCAL)[0]


def test_schema_errors_name_the_file_and_column(tmp_path):
    info = shard_info(tmp_path, pa.table({"body": ["a"], "n": [1]}))
    with pytest.raises(store.InputError, match=r"bad\.parquet: input\.text_column 'text' is not a column"):
        check_schema(info, InputConfig(path="x"))
    with pytest.raises(store.InputError, match=r"bad\.parquet: input\.text_column 'n' has type int64"):
        check_schema(info, InputConfig(path="x", text_column="n"))
    with pytest.raises(store.InputError, match=r"input\.carry_columns 'lang' is not a column"):
        check_schema(info, InputConfig(path="x", text_column="body", carry_columns=["lang"]))


def test_columns_that_collide_with_outputs_are_rejected(tmp_path):
    info = shard_info(tmp_path, pa.table({"text": ["a"], "label": ["x"], "id": [1]}))
    check_schema(info, InputConfig(path="x", label_column="label"))  # gold goes to "gold"
    with pytest.raises(store.InputError, match=r"\['label'\] would collide"):
        check_schema(info, InputConfig(path="x", carry_columns=["label"]))
    with pytest.raises(store.InputError, match=r"\['id'\] would collide"):
        check_schema(info, InputConfig(path="x", carry_columns=["id"]))
    check_schema(info, InputConfig(path="x", id_column="id"))


def test_part_names_are_stable_and_flat():
    assert part_name("day=1/part-7.parquet", 1024) == "day=1__part-7-0000001024.parquet"
    assert part_name("a.parquet", 0) == part_name("a.parquet", 0)


def test_list_shards_folder_glob_list_and_keys(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        for i in range(2):
            pq.write_table(pa.table({"text": ["x"]}), tmp_path / sub / f"p{i}.parquet")
    (tmp_path / "a" / "_SUCCESS.parquet").write_bytes(b"")  # markers are not shards
    folder = store.list_shards(str(tmp_path), LOCAL)
    assert [p.split("/")[-2:] for p in folder] == [["a", "p0.parquet"], ["a", "p1.parquet"],
                                                   ["b", "p0.parquet"], ["b", "p1.parquet"]]
    assert store.list_shards(str(tmp_path / "*" / "p1.parquet"), LOCAL) == [folder[1], folder[3]]
    assert store.list_shards([folder[2], folder[0], folder[2]], LOCAL) == [folder[0], folder[2]]
    assert store.shard_keys(folder) == ["a/p0.parquet", "a/p1.parquet", "b/p0.parquet", "b/p1.parquet"]
    with pytest.raises(store.InputError, match="nothing found at"):
        store.list_shards(str(tmp_path / "missing"), LOCAL)


def test_iter_shard_chunks_cover_every_row_once(tmp_path):
    path = tmp_path / "s.parquet"
    pq.write_table(pa.table({"text": [str(i) for i in range(1000)], "other": list(range(1000))}),
                   path, row_group_size=300)
    chunks = list(store.iter_shard(str(path), ["text"], 128, LOCAL))
    starts = [s for s, _ in chunks]
    rows = [r for _, t in chunks for r in t.column("text").to_pylist()]
    assert rows == [str(i) for i in range(1000)]
    assert starts == sorted(starts) and starts[0] == 0
    assert all(t.column_names == ["text"] for _, t in chunks)


def test_corrupt_shard_is_named(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1 not really parquet")
    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"text": ["x", "y"]}), good)
    infos = store.inspect_shards([str(bad), str(good)], LOCAL)
    assert re.match(r".*broken\.parquet: not a readable Parquet file", infos[0].error)
    assert infos[1].error is None and infos[1].rows == 2


def test_write_part_is_atomic_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "out" / "p.parquet"
    store.write_part(pa.table({"x": [1, 2]}), str(target), LOCAL)
    store.write_part(pa.table({"x": [3]}), str(target), LOCAL)  # a rerun replaces, never appends
    assert pq.read_table(target).column("x").to_pylist() == [3]
    assert sorted(p.name for p in target.parent.iterdir()) == ["p.parquet"]


def test_invalid_utf8_and_control_characters_are_cleaned_and_counted():
    # Parquet readers hand invalid UTF-8 through untouched; a Python decode would then crash.
    raw = pa.array([b"caf\xc3\xa9 ok", b"bad \xff\xfe bytes", b"bell\x07 and\x00nul", b"tab\tline\n",
                    None, b"\x01\x02"], pa.binary())
    for column in (raw.view(pa.string()), raw):  # a string column lying about UTF-8, and bytes
        out = prepare_chunk(pa.table({"text": column}), "s", 0, InputConfig(path="x"))
        assert out.column("text").to_pylist() == [
            "café ok", "bad \ufffd\ufffd bytes", "bell  and nul", "tab\tline\n", None, "  "]
        assert out.column(CLEANED).to_pylist() == [False, True, True, False, False, True]
        assert out.column("error").to_pylist() == [None, None, None, None, "text is null",
                                                   "text is empty"]
        out.validate(full=True)  # what goes on is valid UTF-8


def test_binary_text_columns_pass_the_schema_check(tmp_path):
    info = shard_info(tmp_path, pa.table({"text": pa.array([b"a"], pa.binary())}))
    check_schema(info, InputConfig(path="x"))


def test_multilabel_gold_is_a_list_column_or_a_string_split_at_the_separator(tmp_path):
    as_list = InputConfig(path="x", label_column="tags")
    table = pa.table({"text": ["a", "b", "c"], "tags": pa.array([["x", "y"], [], None], pa.list_(pa.string()))})
    check_schema(shard_info(tmp_path, table), as_list, MULTI_LABEL)
    out = prepare_chunk(table, "s.parquet", 0, as_list, MULTI_LABEL)
    assert out.column(GOLD).to_pylist() == [["x", "y"], [], None]

    joined = InputConfig(path="x", label_column="tags", label_separator="|")
    table = pa.table({"text": ["a", "b", "c"], "tags": ["x | y", "", None]})
    check_schema(shard_info(tmp_path, table), joined, MULTI_LABEL)
    out = prepare_chunk(table, "s.parquet", 0, joined, MULTI_LABEL)
    assert out.column(GOLD).to_pylist() == [["x", "y"], [], None]


def test_a_gold_column_of_the_other_task_is_refused_naming_column_and_file(tmp_path):
    strings = shard_info(tmp_path, pa.table({"text": ["a"], "tags": ["x"]}))
    with pytest.raises(store.InputError, match=r"bad.parquet: input.label_column 'tags' is a string "
                                         r"column, but task: multi_label needs"):
        check_schema(strings, InputConfig(path="x", label_column="tags"), MULTI_LABEL)
    lists = shard_info(tmp_path, pa.table({"text": ["a"], "tags": pa.array([["x"]])}))
    with pytest.raises(store.InputError, match=r"'tags' has type list<.*string>, expected string "
                                         r"\(a list of labels is task: multi_label\)"):
        check_schema(lists, InputConfig(path="x", label_column="tags"))
