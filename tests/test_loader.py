"""The training loader after issue 14: uint8/float16/int16 out of the workers, float32 made on
the device, the same batches as the float32 path for a seed; persistent workers that follow
set_epoch; CUDA options that fall back cleanly without CUDA; their config keys checked."""

from __future__ import annotations

import glob
import io
import json
import math
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from avbalance.errors import UserError

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


# --- the float32 path as it was before issue 14, kept here as the reference -----------------

def old_strip(data: bytes, meta: dict) -> list[torch.Tensor]:
    strip = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.uint8).copy()).permute(2, 0, 1)
    count, stride = meta["frames"]["count"], meta["frames"]["stride"]
    width = meta.get("video", {}).get("width", stride)
    return [strip[:, :, k * stride:k * stride + width] for k in range(count)]


def old_frames(clips: list[torch.Tensor], frames: int, size: int, scale, train: bool, rng: random.Random,
               sampling: str = "consecutive", flow: bool = False, channels: int = 3):
    """PIL decode, per-clip crop, per-frame float normalisation in the worker (the old code;
    ``spread`` sampling and flow as #15 added them)."""
    from torchvision.transforms.v2 import functional as F

    count = len(clips)
    if count == 0:
        return torch.zeros(frames, channels, size, size), torch.zeros(frames, dtype=torch.bool)
    height, width = clips[0].shape[1:]
    n = min(frames, count)
    if sampling == "spread":
        picked = [k * (count // n) for k in range(n)]
    else:
        start = rng.randint(0, count - n) if train else (count - n) // 2
        picked = list(range(start, start + n))
    if train:
        area = height * width * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        h = min(height, int(round(math.sqrt(area / aspect))))
        w = min(width, int(round(math.sqrt(area * aspect))))
        top, left = rng.randint(0, height - h), rng.randint(0, width - w)
        flip = rng.random() < 0.5
    out = []
    for frame in (clips[k] for k in picked):
        if train:
            frame = F.resized_crop(frame, top, left, h, w, [size, size], antialias=True)
            frame = frame.flip(-1) if flip else frame
        else:
            frame = F.center_crop(F.resize(frame, size, antialias=True), [size, size])
        if flow:
            values = (frame.float() - 128.0) / 127.5
            if train and flip:
                values[0::2] = -values[0::2]
            out.append(values)
        else:
            out.append((frame.float() / 255 - MEAN) / STD)
    mask = torch.zeros(frames, dtype=torch.bool)
    mask[: len(out)] = True
    out += [out[-1]] * (frames - len(out))
    return torch.stack(out), mask


def old_sample(sample: dict, cfg, train: bool, rng: random.Random) -> dict:
    load = lambda key: np.load(io.BytesIO(sample[key]), allow_pickle=False)  # noqa: E731
    meta = json.loads(sample["json"])
    inputs = {}
    for modality, source in cfg.modalities.items():
        if source == "spec":
            inputs[modality] = {"x": torch.from_numpy(load("spec.npy").astype(np.float32))[None]}
        elif source == "wav":
            wav = load("wav.npy").astype(np.float32) / 32768.0
            if len(wav) < 16000:
                wav = np.tile(wav, -(-16000 // len(wav)))[:16000] if len(wav) else np.zeros(16000, np.float32)
            limit = int(cfg.max_wav_seconds * 16000)
            if len(wav) > limit:
                start = rng.randrange(len(wav) - limit + 1) if train else 0
                wav = wav[start:start + limit]
            inputs[modality] = {"x": torch.from_numpy(wav)}
        elif source == "face_feats":
            feats, mask = load("face_feats.npy").astype(np.float32), load("face_mask.npy").astype(bool)
            if len(feats) > cfg.max_face_frames:
                start = rng.randrange(len(feats) - cfg.max_face_frames + 1) if train else 0
                feats, mask = feats[start:start + cfg.max_face_frames], mask[start:start + cfg.max_face_frames]
            inputs[modality] = {"x": torch.from_numpy(feats), "mask": torch.from_numpy(mask)}
        elif source == "flow":
            from trainer.flow_input import split_flow

            x, mask = old_frames(split_flow(sample["flow_x.jpg"], sample["flow_y.jpg"], meta), cfg.frames, cfg.image_size,
                                 cfg.crop_scale, train, rng, cfg.frame_sampling, flow=True, channels=2 * meta["flow"]["stack"])
            inputs[modality] = {"x": x, "mask": mask}
        else:
            x, mask = old_frames(old_strip(sample["frames.jpg"], meta), cfg.frames, cfg.image_size, cfg.crop_scale, train, rng,
                                 cfg.frame_sampling)
            inputs[modality] = {"x": x, "mask": mask}
    return {"inputs": inputs, "label": int(meta["label"]), "clip_id": meta["clip_id"]}


# --- helpers ------------------------------------------------------------------------------

def raw_samples(shards: str, part: str) -> list[dict]:
    import webdataset as wds

    urls = sorted(glob.glob(os.path.join(shards, f"{part}-*.tar")))
    return list(wds.WebDataset(urls, shardshuffle=False))


def empty_strip_sample(like: dict) -> dict:
    """A clip whose video did not decode (flag no_video): a 16-pixel black strip, no frames."""
    meta = json.loads(like["json"])
    meta["frames"] = {"count": 0, "stride": 16, "times": []}
    meta.pop("video", None)
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "JPEG")
    return {**like, "json": json.dumps(meta).encode(), "frames.jpg": buf.getvalue()}


def assert_same_batch(new: dict, old: dict) -> None:
    assert new["clip_id"] == old["clip_id"] and torch.equal(new["label"], old["label"])
    for modality, parts in old["inputs"].items():
        assert set(new["inputs"][modality]) == set(parts)
        for key, want in parts.items():
            got = new["inputs"][modality][key]
            assert got.dtype == want.dtype and got.shape == want.shape, (modality, key)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"{modality}.{key}")


@pytest.fixture
def shards(train_shards) -> str:
    return train_shards


MODALITIES = {"audio": "wav", "spec": "spec", "face": "face_feats", "visual": "frames"}


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("jpeg_on_device", [False, True])
@pytest.mark.parametrize("sampling", ["consecutive", "spread"])
def test_batches_equal_the_float32_path(shards, train, jpeg_on_device, sampling):
    from trainer.batching import collate
    from trainer.data_config import DataConfig
    from trainer.sample_decode import to_inputs
    from trainer.device_batch import LoaderPlan, finish

    # 4 frames: clips of 2-3 s have fewer, so padding and masks are exercised; 3 s of waveform
    # and 20 face frames: both are cut (randomly at train time), so their draws interleave.
    cfg = DataConfig(modalities=MODALITIES, frames=4, image_size=40, max_wav_seconds=3.0, max_face_frames=20,
                     frame_sampling=sampling)
    samples = raw_samples(shards, "train")[:11]
    samples.insert(3, empty_strip_sample(samples[0]))
    seed = 5
    convert = to_inputs(cfg, train=train, seed=seed, jpeg_on_device=jpeg_on_device)
    new = [convert(dict(s)) for s in samples]
    if not jpeg_on_device:  # what crosses the worker boundary: the stored dtypes, not float32
        first = new[0]["inputs"]
        assert (first["visual"]["x"].dtype, first["spec"]["x"].dtype, first["face"]["x"].dtype, first["audio"]["x"].dtype) \
            == (torch.uint8, torch.float16, torch.float16, torch.int16)
    rng = random.Random(seed * 1000)  # the generator a loader worker (id 0) draws from
    old = [old_sample(s, cfg, train, rng) for s in samples]
    plan = LoaderPlan(torch.device("cpu"), jpeg_on_device=jpeg_on_device)
    for lo in range(0, len(samples), 6):
        assert_same_batch(finish(collate(new[lo:lo + 6]), cfg, plan), collate(old[lo:lo + 6]))
    empty = finish(collate(new[:6]), cfg, plan)["inputs"]["visual"]
    assert not empty["mask"][3].any() and (empty["x"][3] == 0).all()  # the no-video clip: zeros, masked


def flow_sample(index: int, count: int, width: int = 24, height: int = 16) -> dict:
    """A sample with flow strips in the ``flow`` stage's layout (2 fields per slot); every
    field a different ramp, so a wrong slot, channel, crop or sign shows."""
    from pipelines.stages.frames import encode_strip

    stack = 2
    grid = np.add.outer(np.arange(height), np.arange(width)).astype(np.float64)
    fields = {axis: [np.clip(128 + (j * 7 + shift + index) % 90 - 45 + grid * sign, 0, 255).astype(np.uint8)
                     for j in range(max(count, 1) * stack)] for axis, shift, sign in (("x", 3, 1), ("y", 11, -1))}
    meta = {"clip_id": f"c{index}", "label": index % 3, "flow": {"count": count, "stack": stack, "stride": width},
            "video": {"width": width}}
    return {"json": json.dumps(meta).encode(), "flow_x.jpg": encode_strip(fields["x"], 95)[0],
            "flow_y.jpg": encode_strip(fields["y"], 95)[0]}


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("sampling", ["consecutive", "spread"])
def test_flow_batches_equal_the_float32_path(train, sampling):
    from trainer.batching import collate
    from trainer.data_config import DataConfig
    from trainer.sample_decode import to_inputs
    from trainer.device_batch import LoaderPlan, finish

    cfg = DataConfig(modalities={"motion": "flow"}, frames=3, image_size=12, frame_sampling=sampling)
    samples = [flow_sample(i, count) for i, count in enumerate([5, 2, 0, 7, 3, 6, 1, 4])]
    convert = to_inputs(cfg, train=train, seed=3)
    new = [convert(dict(s)) for s in samples]
    assert new[0]["inputs"]["motion"]["x"].dtype == torch.uint8  # what crosses the worker boundary
    rng = random.Random(3 * 1000)
    old = [old_sample(s, cfg, train, rng) for s in samples]
    plan = LoaderPlan(torch.device("cpu"))
    got, want = finish(collate(new), cfg, plan), collate(old)
    assert_same_batch(got, want)
    assert not got["inputs"]["motion"]["mask"][2].any() and (got["inputs"]["motion"]["x"][2] == 0).all()
    if train:  # some clips were flipped and some not, so both signs of the x fields were checked
        flips = collate(new)["inputs"]["motion"]["flip"]
        assert flips.any() and not flips.all()


@pytest.mark.parametrize("seed", range(3))
def test_the_sync_free_fills_give_the_host_checked_floats(seed):
    """On CUDA the zeros of empty clips and the flipped flow's signs are applied on the device
    without asking the host first (no device sync per batch); on the CPU the host checks
    whether any clip needs it. Both give the same floats, bit for bit (signed zeros included)."""
    from trainer.transforms import flip_flow_x, zero_empty_clips

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, 4, 5, 5, generator=g)
    x[x.abs() < 0.3] = 0.0
    mask = torch.rand(6, 3, generator=g) > 0.5
    mask[0], mask[1] = False, True  # one empty clip, one full one
    flipped = torch.rand(6, generator=g) > 0.5
    flipped[0], flipped[1] = True, False
    for fill, flags in ((zero_empty_clips, mask), (flip_flow_x, flipped), (zero_empty_clips, torch.ones_like(mask)),
                        (flip_flow_x, torch.zeros_like(flipped))):
        host, device = fill(x.clone(), flags, host_check=True), fill(x.clone(), flags, host_check=False)
        assert torch.equal(host.view(torch.int32), device.view(torch.int32)), fill.__name__


def test_set_epoch_replays_what_a_fresh_loader_gives(shards):
    from trainer.data_config import DataConfig
    from trainer.loader import make_loader

    cfg = DataConfig(modalities={"audio": "spec", "visual": "frames"}, batch_size=4, workers=2, image_size=32,
                     frames=2, samples_per_epoch=24, persistent_workers=True, prefetch=1)
    loader, n = make_loader(shards, "train", cfg, train=True, seed=2, epoch=0)
    first = list(loader)
    pids = lambda: [w.pid for w in loader.source.loader._iterator._workers]  # noqa: E731 (DataLoader's)
    before = pids()
    loader.set_epoch(1)
    second = list(loader)
    assert pids() == before  # the same worker processes served both epochs
    fresh, _ = make_loader(shards, "train", cfg, train=True, seed=2, epoch=1)
    expected = list(fresh)
    assert len(first) == len(second) == len(expected) == n
    assert [b["clip_id"] for b in first] != [b["clip_id"] for b in second]  # a new epoch is a new order
    for got, want in zip(second, expected):
        assert_same_batch(got, want)


def test_cuda_options_fall_back_cleanly_without_cuda(monkeypatch, capsys):
    from trainer import device_batch
    from trainer.data_config import DataConfig

    cfg = DataConfig(jpeg_decode="cuda", pin_memory=True)
    monkeypatch.setattr(device_batch, "_WARNED", set())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plan = device_batch.plan_for(cfg, "cuda")
    assert not plan.pin_memory and not plan.jpeg_on_device
    assert "data.jpeg_decode=cuda" in capsys.readouterr().err
    assert device_batch.plan_for(cfg, "cpu") == device_batch.LoaderPlan(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the selection only; no CUDA call is made
    plan = device_batch.plan_for(cfg, "cuda:0")
    assert plan.pin_memory and plan.jpeg_on_device
    assert not device_batch.plan_for(DataConfig(pin_memory=False), "cuda:0").pin_memory
    assert not device_batch.plan_for(cfg, "cpu").jpeg_on_device


@pytest.mark.parametrize("setting, named", [("data.prefetch=0", "data.prefetch"), ("data.jpeg_decode=gpu", "data.jpeg_decode"),
                                            ("data.persistent_workers=2", "data.persistent_workers")])
def test_loader_settings_are_checked(setting, named):
    from trainer.config import load_config

    with pytest.raises(UserError, match=named):
        load_config(None, [setting])
    cfg = load_config(None, ["data.prefetch=4", "data.jpeg_decode=cuda", "data.persistent_workers=false"])
    assert (cfg["data"]["prefetch"], cfg["data"]["jpeg_decode"], cfg["data"]["persistent_workers"]) == (4, "cuda", False)


def test_npy_members_parse_without_numpys_header_eval(monkeypatch):
    """The loader's .npy reader gives np.load's arrays for every dtype the shards store, without
    calling np.load for plain arrays; object arrays are still refused (no pickle)."""
    from trainer import sample_decode

    arrays = [np.random.rand(128, 188).astype(np.float16), np.arange(-5, 5, dtype=np.int16), np.array([True, False]),
              np.asfortranarray(np.random.rand(3, 4).astype(np.float32)), np.zeros((0, 1408), np.float16), np.float32(2.5)]
    saved = []
    for a in arrays:
        buf = io.BytesIO()
        np.save(buf, a)
        saved.append(buf.getvalue())
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load was used for a plain array"))
    for a, raw in zip(arrays, saved):
        got = sample_decode._npy(raw)
        assert got.dtype == a.dtype and got.shape == np.shape(a) and np.array_equal(got, a) and got.flags.writeable
    with pytest.raises(ValueError):
        sample_decode._npy(saved[0][:-10])  # cut short: an error the loader reports as a sample that does not decode
    monkeypatch.setattr(np, "load", real_load)
    # An object array's .npy, written by hand (its payload would be a pickle; never made here).
    header = b"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    objects = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"not a pickle"
    with pytest.raises(ValueError, match="allow_pickle"):
        sample_decode._npy(objects)


def test_a_kept_loader_leaves_the_global_generator_where_fresh_loaders_did(shards):
    """Model-side randomness (dropout, OGM-GE's noise) follows torch's global generator; a
    fresh DataLoader iterator draws from it, so a loader whose workers live on must draw too,
    or every epoch after the first trains with other random numbers than before."""
    from trainer.data_config import DataConfig
    from trainer.loader import make_loader

    cfg = DataConfig(modalities={"audio": "spec"}, batch_size=4, workers=2, samples_per_epoch=8, prefetch=1)

    def after_three_passes(kept: bool) -> torch.Tensor:
        torch.manual_seed(11)
        loader, _ = make_loader(shards, "train", cfg, train=True, seed=1)
        for epoch in range(3):
            if not kept:
                loader, _ = make_loader(shards, "train", DataConfig(**{**cfg.__dict__, "persistent_workers": False}),
                                        train=True, seed=1, epoch=epoch)
            loader.set_epoch(epoch)
            list(loader)
        return torch.rand(4)

    assert torch.equal(after_three_passes(kept=True), after_three_passes(kept=False))


def test_the_shuffle_never_mixes_passes_and_empties_at_each_pass_end():
    from trainer.loader import shuffle_by_pass

    samples = [{"__pass__": p, "i": i} for p in range(3) for i in range(10)]
    damage = {"__corrupt__": {"shard": "x"}}
    for bufsize in (4, 10, 64):  # smaller than a pass, equal, larger
        out = list(shuffle_by_pass(bufsize, min(bufsize, 3), random.Random(0))(iter(samples[:15] + [damage] + samples[15:])))
        got = [s for s in out if "__pass__" in s]
        assert [s["__pass__"] for s in got] == sorted(s["__pass__"] for s in got)  # pass 0 all out before pass 1
        for p in range(3):
            ids = [s["i"] for s in got if s["__pass__"] == p]
            assert sorted(ids) == list(range(10))  # every sample of a pass once
        assert [s["i"] for s in got] != [s["i"] for s in samples]  # and shuffled
        assert damage in out
    assert [s["i"] for s in shuffle_by_pass(0, 0, random.Random(0))(iter(samples))] == [s["i"] for s in samples]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_training_epoch_reads_no_sample_twice(shards, workers):
    from trainer.data_config import DataConfig
    from trainer.loader import make_loader

    """An epoch of a small part is a random permutation of it (cut to whole batches), as a
    map-style loader's shuffle=True: no clip twice while others wait for the next epoch."""
    cfg = DataConfig(modalities={"audio": "spec"}, batch_size=8, workers=workers)
    loader, n_batches = make_loader(shards, "train", cfg, train=True, seed=3)
    index = json.load(open(os.path.join(shards, "shards.json")))
    n_train = index["parts"]["train"]["samples"]
    orders = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        ids = [c for b in loader for c in b["clip_id"]]
        assert len(ids) == n_batches * 8 and len(set(ids)) == len(ids), f"epoch {epoch}: a clip read twice"
        assert len(ids) > n_train - 8 * workers  # at most a partial batch per worker left out
        orders.append(ids)
    assert orders[0] != orders[1]  # reshuffled every epoch


def test_worker_shares_follow_the_samples_each_worker_holds():
    from trainer.loader import worker_shares

    assert worker_shares(6, [36, 18]) == [4, 2]
    assert worker_shares(22, [180, 180]) == [11, 11]
    assert worker_shares(5, [10, 10, 10]) == [2, 2, 1]  # remainders to the lower workers
    assert worker_shares(7, [0, 0]) == [4, 3]  # nothing known: equal, as before
    assert all(sum(worker_shares(n, s)) == n for n in range(12) for s in ([3, 1], [5, 5, 1], [1]))
