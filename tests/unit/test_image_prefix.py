"""Images in the radix key: the same image is a prefix hit, a different image with the same
text is not, and workers get every image of a sequence with it."""

from __future__ import annotations

import hashlib

import numpy as np
from fake_worker import assert_idle_invariant, make, run_to_idle

from fovea.common.messages import ImageInput, TokenizedRequest
from fovea.common.sampling import SamplingParams
from fovea.scheduler.request import image_key_values, radix_key

PAD = 9  # the placeholder token id


def image(name: str, offset: int, n: int) -> ImageInput:
    digest = hashlib.blake2b(name.encode(), digest_size=32).digest()
    return ImageInput(digest, offset, n, np.zeros((n, 4), np.float32), [1, n, 1])


def image_req(rid: str, ids: list[int], images: list[ImageInput]) -> TokenizedRequest:
    return TokenizedRequest(
        rid=rid, index=0, input_ids=ids, sampling=SamplingParams(max_new_tokens=2), images=images
    )


def test_image_key_values_exact() -> None:
    digest = bytes(range(32))
    w0 = int.from_bytes(bytes(range(8)), "little")
    w1 = int.from_bytes(bytes(range(8, 16)), "little")
    mask = (1 << 62) - 1
    expect = [-1 - (w0 & mask), -1 - ((w1 ^ 0x9E3779B97F4A7C15) & mask)]
    assert image_key_values(digest, 2) == expect
    vals = image_key_values(digest, 64)
    assert len(set(vals)) == 64 and max(vals) < 0
    # A digest differing only in its last byte differs from the 4th position on.
    other = image_key_values(digest[:31] + b"\xff", 8)
    assert other[:3] == vals[:3] and other[3] != vals[3] and other[7] != vals[7]


def test_radix_key_replaces_only_the_span() -> None:
    img = image("x", 2, 3)
    key = radix_key([5, 6, PAD, PAD, PAD, 7], [img])
    assert key[:2] == [5, 6] and key[5] == 7
    assert key[2:5] == image_key_values(img.hash, 3)
    assert radix_key([5, 6], []) == [5, 6]


def test_same_image_hits_different_image_misses() -> None:
    sched, worker = make()
    ids = [5, 6, PAD, PAD, PAD, PAD, 7, 8]
    sched.handle(image_req("a", ids, [image("cat", 2, 4)]))
    run_to_idle(sched, worker)
    [sent] = worker.plans[0].new[0].images
    assert (sent.hash, sent.offset, sent.num_tokens) == (image("cat", 2, 4).hash, 2, 4)
    # Same text, same image: everything but the last prompt token is cached.
    sched.handle(image_req("b", ids, [image("cat", 2, 4)]))
    # Same text, another image: only the text before the image is.
    sched.handle(image_req("c", ids, [image("dog", 2, 4)]))
    run_to_idle(sched, worker)
    cached = {o.rid: o.cached_tokens for o in sched.outputs if o.finish_reason}
    assert cached == {"a": 0, "b": 7, "c": 2}
    # A text-only prompt with the placeholder ids does not hit the image either.
    sched.handle(image_req("d", ids, []))
    run_to_idle(sched, worker)
    assert [o.cached_tokens for o in sched.outputs if o.rid == "d"][-1] == 2
    assert_idle_invariant(sched)


def test_retraction_resends_images() -> None:
    sched, worker = make(num_slots=12)
    names = {"a": "cat", "b": "dog", "c": "owl"}
    for rid, name in names.items():
        sched.handle(
            TokenizedRequest(
                rid=rid,
                index=0,
                input_ids=[5, PAD, PAD],
                sampling=SamplingParams(max_new_tokens=6),
                images=[image(name, 1, 2)],
            )
        )
    run_to_idle(sched, worker)
    sent = [(n.key, n.images[0].hash) for p in worker.plans for n in p.new]
    assert sched.num_retractions >= 1 and len(sent) > 3  # a retracted sequence went again
    assert all(h == image(names[key[0]], 1, 2).hash for key, h in sent)
    assert_idle_invariant(sched)
