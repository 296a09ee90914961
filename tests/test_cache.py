"""The on-disk tap cache: extract once, reuse across TapCache objects (as a new process would)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mmcl_edge.backbones import create_backbone
from mmcl_edge.preprocess import PreprocessSpec, preprocess_batch
from mmcl_edge.taps import TapCache, sample_key

pytestmark = pytest.mark.usefixtures("single_thread")

SPEC = PreprocessSpec(kind="image", image_size=32)


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("tiny-cnn", image_size=32)


def images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(0, 255, size=(20, 20)).astype(np.float32) for _ in range(n)]


def direct_taps(backbone, samples) -> list[np.ndarray]:
    """The taps computed without the cache, for comparison."""
    with torch.no_grad():
        return [t.numpy() for t in backbone(torch.from_numpy(preprocess_batch(samples, SPEC)))]


def test_first_get_extracts_all_then_nothing(tmp_path, backbone):
    samples = images(8, seed=0)
    calls = []
    cache = TapCache(tmp_path)
    taps, stats = cache.get("cam", samples, SPEC, backbone, batch_size=3, progress=calls.append)
    assert stats.requested == 8 and stats.extracted == 8
    assert sum(calls) == 8 and len(calls) == 3            # batches of 3, 3, 2
    assert [t.shape for t in taps] == [(8, 4, 8), (8, 4, 16)]
    for got, want in zip(taps, direct_taps(backbone, samples)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    again, stats2 = cache.get("cam", samples, SPEC, backbone)
    assert stats2.extracted == 0 and stats2.requested == 8
    for a, b in zip(taps, again):
        assert np.array_equal(a, b)

    fresh, stats3 = TapCache(tmp_path).get("cam", samples, SPEC, backbone, progress=calls.append)
    assert stats3.extracted == 0
    assert sum(calls) == 8                                 # no backbone work in the new "process"
    for a, b in zip(taps, fresh):
        assert np.array_equal(a, b)


def test_mix_of_old_and_new_extracts_only_new(tmp_path, backbone):
    old, new = images(5, seed=1), images(3, seed=2)
    first, _ = TapCache(tmp_path).get("cam", old, SPEC, backbone)

    mixed = [new[0], old[2], old[0], new[1], old[4], new[2]]
    cache = TapCache(tmp_path)
    taps, stats = cache.get("cam", mixed, SPEC, backbone)
    assert stats.requested == 6 and stats.extracted == 3
    # rows come back in request order: cached rows as before, new rows as the backbone gives them
    want_new = direct_taps(backbone, new)
    for i, got in enumerate(taps):
        assert np.array_equal(got[1], first[i][2]) and np.array_equal(got[2], first[i][0])
        assert np.array_equal(got[4], first[i][4])
        np.testing.assert_allclose(got[[0, 3, 5]], want_new[i], rtol=1e-5, atol=1e-6)

    _, stats = TapCache(tmp_path).get("cam", old + new, SPEC, backbone)
    assert stats.extracted == 0


def test_duplicates_in_one_request_are_extracted_once(tmp_path, backbone):
    a, b, c = images(3, seed=3)
    request = [a, b, a.copy(), c, b, a]
    taps, stats = TapCache(tmp_path).get("cam", request, SPEC, backbone)
    assert stats.requested == 6 and stats.extracted == 3
    for t in taps:
        assert np.array_equal(t[0], t[2]) and np.array_equal(t[0], t[5]) and np.array_equal(t[1], t[4])
        assert not np.array_equal(t[0], t[1])
    _, stats = TapCache(tmp_path).get("cam", [c, b, a], SPEC, backbone)
    assert stats.extracted == 0


def test_cache_is_keyed_by_modality_and_preprocessing(tmp_path, backbone):
    samples = images(4, seed=4)
    cache = TapCache(tmp_path)
    cache.get("cam", samples, SPEC, backbone)
    assert cache.get("other", samples, SPEC, backbone)[1].extracted == 4
    assert cache.get("cam", samples, PreprocessSpec(kind="image", image_size=16), backbone)[1].extracted == 4
    # the same pixels in another dtype are another sample
    assert cache.get("cam", [s.astype(np.float64) for s in samples], SPEC, backbone)[1].extracted == 4


def test_keys_ending_in_nul_bytes_survive_a_reload(tmp_path, backbone):
    # numpy's fixed-width bytes drop trailing NULs; such a digest must still be found later
    rng = np.random.default_rng(5)
    sample = next(x for x in (rng.uniform(0, 255, size=(20, 20)).astype(np.float32) for _ in range(20000))
                  if sample_key(x).endswith(b"\0"))
    samples = [sample] + images(2, seed=6)
    taps, stats = TapCache(tmp_path).get("cam", samples, SPEC, backbone)
    assert stats.extracted == 3
    again, stats = TapCache(tmp_path).get("cam", samples, SPEC, backbone)
    assert stats.extracted == 0
    for a, b in zip(taps, again):
        assert np.array_equal(a, b)


def test_shard_being_written_is_not_read(tmp_path, backbone):
    samples = images(3, seed=7)
    TapCache(tmp_path).get("cam", samples, SPEC, backbone)
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    (folder / "shard_00001.tmp.npz").write_bytes(b"PK\x03\x04 half written")   # another writer, mid-save
    taps, stats = TapCache(tmp_path).get("cam", samples + images(2, seed=8), SPEC, backbone)
    assert stats.extracted == 2 and taps[0].shape[0] == 5
    _, stats = TapCache(tmp_path).get("cam", samples + images(2, seed=8), SPEC, backbone)
    assert stats.extracted == 0
