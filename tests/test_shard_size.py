"""The default shard size: a target in MB for streaming, with a floor of shards per part so
every reader of a cluster (ranks x loader workers) owns a shard, and of samples per shard."""

from __future__ import annotations

import math

from pipelines.stages.pack import MIN_SHARD_SAMPLES, PackConfig, sample_bytes, samples_per_shard

MB = 2**20


def shards(n: int, per: int) -> int:
    return math.ceil(n / per)


def test_a_large_corpus_gets_shards_of_the_target_size():
    per = samples_per_shard(200_000, PackConfig(), sample_bytes=500_000)  # VGGSound-size, 0.5 MB a sample
    assert per == 256 * MB // 500_000 and 200 * MB < per * 500_000 <= 256 * MB
    assert shards(200_000, per) >= PackConfig().min_shards


def test_a_small_corpus_still_gets_a_shard_per_reader():
    cfg = PackConfig()
    per = samples_per_shard(6698, cfg, sample_bytes=500_000)  # CREMA-D's OGM train part: 3.3 GB
    assert per < 256 * MB // 500_000 and shards(6698, per) >= cfg.min_shards
    assert samples_per_shard(6698, PackConfig(min_shards=4), sample_bytes=500_000) > per


def test_tiny_parts_keep_a_floor_of_samples_and_an_explicit_count_wins():
    assert samples_per_shard(54, PackConfig(), sample_bytes=10_000) == MIN_SHARD_SAMPLES
    assert samples_per_shard(54, PackConfig(), sample_bytes=None) == MIN_SHARD_SAMPLES
    assert samples_per_shard(6698, PackConfig(samples_per_shard=100), sample_bytes=500_000) == 100
    assert samples_per_shard(10_000, PackConfig(shard_mb=1), sample_bytes=MB // 4) == MIN_SHARD_SAMPLES


def test_sample_bytes_counts_the_members_not_the_key():
    assert sample_bytes({"__key__": "clip", "json": b"{}", "wav.npy": b"x" * 10}) == 12


def test_the_default_keeps_the_shards_of_small_parts_as_before():
    """Below 16 x 256 samples the default rule cuts a part as the earlier one did (about 16
    shards, 8..256 samples each), so shard sets made before (and the study's results, which
    depend on the shard order) stay the same."""
    for n in range(1, 4097):
        assert samples_per_shard(n, PackConfig(), sample_bytes=400_000) == max(8, min(256, math.ceil(n / 16))), n
