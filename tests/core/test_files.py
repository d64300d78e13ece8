"""File contents in parts: lines read across part boundaries exactly as from the whole."""

import random

from core.files import lines


def test_lines_across_any_split_are_the_lines_of_the_whole():
    rng = random.Random(7)
    pieces = [b"a", b"{\"k\": 1}", b"\n", b"\r", b"\r\n", b"\xe2\x80\xa8", b"  ", b""]
    for _ in range(3000):
        whole = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        cuts = sorted(rng.sample(range(len(whole) + 1), min(len(whole) + 1, rng.randint(0, 6))))
        chunks, start = [], 0
        for cut in [*cuts, len(whole)]:
            chunks.append(whole[start:cut])
            start = cut
        assert list(lines(chunks)) == whole.splitlines(), (whole, chunks)
