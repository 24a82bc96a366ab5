import pytest

from ldm.data.shards import ShardSpecError, expand_shards
from ldm.errors import UserError


@pytest.fixture
def shard_dir(tmp_path):
    for i in range(3):
        (tmp_path / f"part-{i:03d}.tar").write_bytes(b"")
    return tmp_path


def test_brace_glob_and_list_specs(shard_dir):
    braces = expand_shards(f"{shard_dir}/part-{{000..002}}.tar")
    assert [p.rsplit("/", 1)[1] for p in braces] == ["part-000.tar", "part-001.tar", "part-002.tar"]
    assert expand_shards(f"{shard_dir}/part-*.tar") == braces
    assert expand_shards([f"{shard_dir}/part-000.tar", f"{shard_dir}/part-00[12].tar"]) == braces


def test_remote_specs_are_expanded_not_checked():
    urls = expand_shards("pipe:aws s3 cp s3://bucket/{00..02}.tar -")
    assert urls == [f"pipe:aws s3 cp s3://bucket/{i:02d}.tar -" for i in range(3)]


def test_spec_matching_nothing_names_it(tmp_path):
    with pytest.raises(ShardSpecError, match="no shard found") as error:
        expand_shards(f"{tmp_path}/missing-{{000..009}}.tar")
    assert isinstance(error.value, UserError)
    assert "missing-{000..009}" in str(error.value)


def test_partly_missing_brace_range_is_an_error(shard_dir):
    with pytest.raises(ShardSpecError, match="do not exist"):
        expand_shards(f"{shard_dir}/part-{{000..004}}.tar")


def test_empty_spec_is_an_error():
    with pytest.raises(ShardSpecError):
        expand_shards([])
