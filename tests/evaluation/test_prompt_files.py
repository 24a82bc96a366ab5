"""Prompt files are hostile input: UTF-8 or one line naming the file, bounded memory, bounded counts."""

import io
import tarfile
import tracemalloc

import pytest

from ldm.errors import UserError
from ldm.evaluation import sampling_job
from ldm.evaluation.sampling_job import MAX_PROMPT_CHARS, read_prompt_records


def _read(path):
    return read_prompt_records(None, str(path))


def test_a_latin1_file_names_the_file_line_and_fix(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("a red circle\nun caf\u00e9 rouge\n".encode("latin-1"))
    with pytest.raises(UserError, match=rf"{path}:2: not UTF-8 text \(byte 0xe9 at column 7\): save the file as UTF-8"):
        _read(path)


@pytest.mark.parametrize("content", ["", "\n \n\t\n"])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_an_empty_file_is_one_line(tmp_path, content, suffix):
    path = tmp_path / f"prompts{suffix}"
    path.write_text(content)
    with pytest.raises(UserError, match=f"prompts file is empty: {path}"):
        _read(path)


def test_a_missing_file_or_a_directory_is_one_line(tmp_path):
    with pytest.raises(UserError, match="prompts file not found"):
        _read(tmp_path / "nope.txt")
    with pytest.raises(UserError, match="prompts file is not a regular file"):
        _read(tmp_path)


def test_a_byte_order_mark_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffa red circle\r\nun caf\u00e9\r\n".encode())
    assert [r["prompt"] for r in _read(path)] == ["a red circle", "un caf\u00e9"]


def test_a_huge_line_is_cut_without_being_held_in_memory(tmp_path, capsys):
    path = tmp_path / "prompts.txt"
    with open(path, "w") as f:
        f.write("first\n" + "\u00e9" * (10 << 20) + "\nlast\n")  # a 20 MB line of 2-byte characters
    tracemalloc.start()
    try:
        records = _read(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, peak
    assert [len(r["prompt"]) for r in records] == [5, MAX_PROMPT_CHARS, 4]
    assert "1 prompt(s) longer than" in capsys.readouterr().err


def test_a_long_jsonl_line_is_refused(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "' + "x" * (sampling_job.MAX_JSONL_LINE_BYTES + 10) + '"}\n')
    with pytest.raises(UserError, match=rf"{path}:1: line longer than {sampling_job.MAX_JSONL_LINE_BYTES} bytes"):
        _read(path)


def test_deeply_nested_jsonl_is_one_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "x", "f": ' + "[" * 20000 + "]" * 20000 + "}\n")
    with pytest.raises(UserError, match=rf"{path}:1: not JSON"):
        _read(path)


def test_file_size_and_prompt_count_are_capped(tmp_path, monkeypatch):
    import ldm.jsonl

    path = tmp_path / "prompts.txt"
    path.write_text("a prompt\n" * 200)
    monkeypatch.setattr(sampling_job, "MAX_PROMPTS", 150)
    with pytest.raises(UserError, match=rf"{path}: more than 150 prompts: split them"):
        _read(path)
    monkeypatch.setattr(ldm.jsonl, "MAX_FILE_BYTES", 1000)
    with pytest.raises(UserError, match=rf"{path}: .* MiB is more than"):
        _read(path)


def test_a_huge_shard_caption_is_read_only_up_to_the_cap(tmp_path):
    shard = tmp_path / "captions-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, text in (("a", "\u00e9" * (1 << 20)), ("b", "short")):
            data = text.encode()
            info = tarfile.TarInfo(f"{key}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    records = read_prompt_records(None, None, str(shard))
    assert [len(r["prompt"]) for r in records] == [MAX_PROMPT_CHARS, 5]
