"""The gallery store on its own: files and rows, PNG metadata, listing, search, delete, crash safety."""

from __future__ import annotations

import io
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from muse.datadir import DataDirError, DataDirLock
from muse.infotext import png_with_text
from muse.messages import GeneratedImage, GenerateRequest, GenerateResult, Timings
from muse.storage import Gallery


def png(color: tuple[int, int, int] = (200, 30, 30), size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def result(
    prompt: str = "a red square", n: int = 1, seed: int = 42, negative: str = "", scheduler: str = ""
) -> GenerateResult:
    request = GenerateRequest(
        prompt=prompt,
        seed=seed,
        steps=4,
        guidance_scale=3.5,
        width=8,
        height=8,
        n=n,
        negative_prompt=negative,
        scheduler=scheduler,
    )
    return GenerateResult(
        images=[GeneratedImage(png(), s) for s in request.seeds()],
        model="tiny",
        steps=4,
        width=8,
        height=8,
        batch_size=n,
        timings=Timings(queued_ms=1.5, compute_ms=20.0, total_ms=22.0),
        request=request,
    )


@pytest.fixture
def gallery(tmp_path: Path) -> Iterator[Gallery]:
    store = Gallery(tmp_path / "data")
    yield store
    store.close()


def test_save_writes_png_with_a1111_parameters_and_a_row(gallery: Gallery) -> None:
    [image_id] = gallery.save(result("a red square", negative="blurry", scheduler="Euler a"))
    path = gallery.png_path(image_id)
    assert path is not None and path.parent == gallery.images_dir
    with Image.open(path) as image:
        assert image.size == (8, 8)
        assert image.info["parameters"] == (
            "a red square\nNegative prompt: blurry\n"
            "Steps: 4, Sampler: Euler a, CFG scale: 3.5, Seed: 42, Size: 8x8, Model: tiny"
        )
    row = gallery.get(image_id)
    assert row is not None
    assert (row.prompt, row.negative_prompt, row.seed, row.steps, row.width, row.height) == (
        "a red square",
        "blurry",
        42,
        4,
        8,
        8,
    )
    assert (row.guidance_scale, row.scheduler, row.model) == (3.5, "Euler a", "tiny")
    assert (row.compute_ms, row.total_ms) == (20.0, 22.0)
    assert row.bytes == path.stat().st_size and row.created > 0


def test_each_image_of_a_request_gets_its_own_seed_and_id(gallery: Gallery) -> None:
    ids = gallery.save(result(n=3, seed=10))
    assert len(set(ids)) == 3
    assert [gallery.get(i).seed for i in ids] == [10, 11, 12]  # type: ignore[union-attr]


def test_non_latin1_prompt_goes_in_an_itxt_chunk(gallery: Gallery) -> None:
    [image_id] = gallery.save(result("海辺の灯台 🌅"))
    with Image.open(gallery.png_path(image_id)) as image:  # type: ignore[arg-type]
        assert image.info["parameters"].startswith("海辺の灯台 🌅\nSteps: 4, Sampler: Default,")


def test_the_models_own_scheduler_is_named_when_the_request_left_it_to_the_model(gallery: Gallery) -> None:
    [own] = gallery.save(result("own"), model_scheduler="DDIM")
    [chosen] = gallery.save(result("chosen", scheduler="Euler a"), model_scheduler="DDIM")
    for image_id, sampler in [(own, "DDIM"), (chosen, "Euler a")]:
        with Image.open(gallery.png_path(image_id)) as image:  # type: ignore[arg-type]
            assert f"Sampler: {sampler}," in image.info["parameters"]


def test_text_chunk_keeps_the_pixels() -> None:
    original = png((1, 2, 3))
    tagged = png_with_text(original, "parameters", "p\nSteps: 1")
    assert Image.open(io.BytesIO(tagged)).tobytes() == Image.open(io.BytesIO(original)).tobytes()
    with pytest.raises(ValueError):
        png_with_text(b"not a png", "parameters", "x")


def test_database_runs_in_wal_mode_without_full_sync(gallery: Gallery) -> None:
    db = sqlite3.connect(gallery.data_dir / "gallery.sqlite3")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    # synchronous is per connection: read it from the gallery's own.
    assert gallery._db.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL


def test_save_never_fsyncs(gallery: Gallery, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(fd: int) -> None:
        raise AssertionError("save must not fsync: it runs on the event loop")

    monkeypatch.setattr(os, "fsync", refuse)
    assert len(gallery.save(result(n=2))) == 2


def test_a_failed_rename_leaves_neither_file_nor_row(gallery: Gallery, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        gallery.save(result())
    assert list(gallery.images_dir.iterdir()) == []
    assert gallery.page().total == 0


def test_rows_are_written_after_their_files(gallery: Gallery, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between file and row leaves an orphan file, never a row without its file."""
    seen: list[int] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        seen.append(gallery.page().total)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    gallery.save(result(n=2))
    assert seen == [0, 0]


def test_leftover_temp_files_are_removed_on_open(tmp_path: Path) -> None:
    first = Gallery(tmp_path)
    first.close()
    (first.images_dir / ".0123456789abcdef.png.tmp").write_bytes(b"half")
    Gallery(tmp_path).close()
    assert list(first.images_dir.glob("*.tmp")) == []


def test_gallery_survives_reopening(tmp_path: Path) -> None:
    first = Gallery(tmp_path)
    ids = first.save(result("kept"))
    first.close()
    again = Gallery(tmp_path)
    assert [i.id for i in again.page().images] == ids
    assert again.png_path(ids[0]) is not None
    again.close()


def test_listing_is_newest_first_with_stable_cursors(gallery: Gallery) -> None:
    ids = [gallery.save(result(f"image {i}"))[0] for i in range(7)]
    newest_first = ids[::-1]
    first = gallery.page(limit=3)
    assert [i.id for i in first.images] == newest_first[:3]
    assert first.newer is None and first.older == newest_first[2] and first.total == 7
    gallery.save(result("arrives later"))  # must not shift the next page
    second = gallery.page(limit=3, after=first.older)
    assert [i.id for i in second.images] == newest_first[3:6]
    last = gallery.page(limit=3, after=second.older)
    assert [i.id for i in last.images] == newest_first[6:] and last.older is None
    back = gallery.page(limit=3, before=last.newer)
    assert [i.id for i in back.images] == newest_first[3:6]


def test_search_matches_prompt_substrings_case_insensitively(gallery: Gallery) -> None:
    gallery.save(result("A Red Fox"))
    gallery.save(result("a blue whale"))
    gallery.save(result("100% red_velvet"))
    assert [i.prompt for i in gallery.page("red").images] == ["100% red_velvet", "A Red Fox"]
    assert [i.prompt for i in gallery.page("0% r").images] == ["100% red_velvet"]
    assert gallery.page("%").total == 1 and gallery.page("_").total == 1, "wildcards match themselves"
    assert gallery.page("whale").total == 1 and gallery.page("  ").total == 3


def test_delete_removes_row_then_file(gallery: Gallery) -> None:
    [image_id] = gallery.save(result())
    path = gallery.png_path(image_id)
    assert gallery.delete(image_id) is True
    assert gallery.get(image_id) is None and path is not None and not path.exists()
    assert gallery.delete(image_id) is False


def test_ids_that_are_not_gallery_ids_are_refused(gallery: Gallery) -> None:
    assert gallery.get("../gallery") is None
    assert gallery.png_path("..") is None
    assert gallery.delete("*") is False


def test_another_owners_image_is_no_cursor(gallery: Gallery) -> None:
    theirs = gallery.save(result("theirs"), owner="key:a")
    mine = [gallery.save(result(f"mine {i}"), owner="key:b")[0] for i in range(3)]
    first = gallery.page(limit=2, owner="key:b")
    assert gallery.page(limit=2, after=theirs[0], owner="key:b") == first, "an unknown cursor: the first page"
    assert [i.id for i in gallery.page(limit=5, owner="key:b").images] == mine[::-1]


def test_files_are_readable_by_their_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o022)  # the usual one, under which files were made 0644 and folders 0755
    try:
        gallery = Gallery(tmp_path / "data")
        [image_id] = gallery.save(result())
    finally:
        os.umask(previous)
    path = gallery.png_path(image_id)
    assert path is not None
    made = [gallery.data_dir, gallery.images_dir, path, *gallery.data_dir.glob("gallery.sqlite3*")]
    assert {p.name for p in made} >= {"gallery.sqlite3", "gallery.sqlite3-wal"}, "the database's files, WAL too"
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in made}
    gallery.close()
    assert modes == {p.name: oct(0o700 if p.is_dir() else 0o600) for p in made}


@pytest.mark.parametrize("kind", ["corrupt", "foreign"])
def test_a_database_that_is_not_the_gallerys_is_refused_in_one_line_and_left_as_it_is(
    tmp_path: Path, kind: str
) -> None:
    database = tmp_path / "gallery.sqlite3"
    if kind == "corrupt":
        database.write_bytes(b"this is not a database, but somebody's file" * 100)
    else:
        with sqlite3.connect(database) as other:
            other.execute("CREATE TABLE invoices (number INTEGER, total REAL)")
    before = database.read_bytes()
    with pytest.raises(DataDirError) as refused:
        Gallery(tmp_path)
    message = str(refused.value)
    assert "\n" not in message and str(database) in message and "not a Muse gallery" in message
    assert ("invoices" in message) == (kind == "foreign")
    assert database.read_bytes() == before, "never overwritten"


def test_a_second_server_on_one_data_dir_is_refused_naming_the_lock_and_its_holder(tmp_path: Path) -> None:
    first = DataDirLock(tmp_path).acquire()
    try:
        with pytest.raises(DataDirError) as refused:
            DataDirLock(tmp_path).acquire()
        assert f"pid {os.getpid()} holds {tmp_path / 'muse.lock'}" in str(refused.value)
    finally:
        first.release()
    DataDirLock(tmp_path).acquire().release()  # the lock goes with its holder


def test_muse_serve_on_a_data_dir_in_use_exits_with_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    held = DataDirLock(tmp_path).acquire()
    try:
        run = subprocess.run(
            [sys.executable, "-m", "muse", "serve", "--port", "0", "--data-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        held.release()
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("muse serve: error: ")
    assert "in use by another Muse server" in run.stderr
