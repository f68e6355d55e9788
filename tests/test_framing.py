from __future__ import annotations

import multiprocessing as mp
import os
import threading

import pytest

from muse.messages import Progress, Result
from muse.pools.framing import FrameReader


def test_reader_reassembles_large_messages_arriving_in_pieces() -> None:
    parent, child = mp.get_context("spawn").Pipe()
    os.set_blocking(parent.fileno(), False)
    big = Result("job", [os.urandom(3_000_000), b"x"], 1.0)
    writer = threading.Thread(target=lambda: [child.send(m) for m in (Progress("job", 1, 2), big, Progress("j", 2, 2))])
    writer.start()
    reader, got = FrameReader(parent.fileno()), []
    while len(got) < 3:
        got.extend(reader.read())  # never blocks: yields only complete messages
    writer.join()
    assert got == [Progress("job", 1, 2), big, Progress("j", 2, 2)]
    child.close()
    with pytest.raises(EOFError):
        list(reader.read())
