"""Test-time views (--test-views T,S): one view is exactly the training decoder; T x S views are the
peers' evenly spaced temporal windows x crops along the long side, logits averaged per clip, checked
against a reference built here from PyAV frames and torch."""

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vaemo_dist.data.decode_files import decode_audio
from vaemo_dist.data.decode_pyav import RGB_CONVERSION, audio_tensor
from vaemo_dist.data.sources import Record, decode_record, open_source
from vaemo_dist.data.synth import write_media_file
from vaemo_dist.eval.downstream import (
    StartupError,
    _view_tensors,
    crop_offsets,
    decode_views,
    evaluate,
    evaluate_logits,
    parse_views,
    record_sample,
    window_starts,
)
from vaemo_dist.objectives.finetune import Classifier
from vaemo_dist.pretrained import from_pretrained

CPU = torch.device("cpu")


def test_view_placement():
    assert parse_views("2,2") == (2, 2) and parse_views(" 3 , 1") == (3, 1)
    for bad in ("2", "0,1", "a,b", "2,2,2"):
        with pytest.raises(StartupError, match="--test-views"):
            parse_views(bad)
    assert window_starts(40, 13, 1) == [13]  # centred, as decode_pyav.sample_indices
    assert window_starts(40, 13, 2) == [0, 27] and window_starts(40, 13, 3) == [0, 13, 27]
    assert window_starts(10, 13, 2) == [0, 0]  # shorter than a window: the same padded window
    assert crop_offsets(64, 48, 1) == [8] and crop_offsets(64, 48, 2) == [0, 16]
    assert crop_offsets(64, 48, 3) == [0, 8, 16] and crop_offsets(48, 48, 2) == [0, 0]


@pytest.fixture(scope="module")
def setup(tiny_export, tmp_path_factory):
    folder = tmp_path_factory.mktemp("views")
    write_media_file(folder / "wide.mp4", seconds=1.6, fps=25, width=64, height=48, seed=1)
    write_media_file(folder / "tall.mp4", seconds=1.2, fps=25, width=48, height=64, seed=2)
    (folder / "clips.csv").write_text("path,label\nwide.mp4,a\ntall.mp4,b\n")
    source = open_source(folder / "clips.csv")
    export = from_pretrained(tiny_export)
    torch.manual_seed(0)
    model = Classifier(export.model, 3, "av").eval()
    return folder, source, export.inputs, model


def reference_views(path, inputs, segments, crops, sound=None):
    """The views built independently: every frame from PyAV, windows / crops placed by hand (the first
    window at frame 0, the last ending on the clip's last frame; crops at both ends of the long side),
    torch's bilinear resize with antialias, normalised; audio windows centred on the video windows."""
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24", interpolation=RGB_CONVERSION)
                  for f in container.decode(video=0)]
    cfg, total = inputs.video, len(frames)
    span = (cfg.frames - 1) * cfg.stride + 1
    starts = {1: [(total - span) // 2], 2: [0, total - span]}[segments]
    wave = decode_audio("ref", sound or path.read_bytes(), inputs.audio)
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    out = []
    for start in starts:
        picked = [start + i * cfg.stride for i in range(cfg.frames)]
        clip = torch.from_numpy(np.stack([frames[i] for i in picked])).permute(0, 3, 1, 2).float()
        h, w = clip.shape[-2:]
        side = min(h, w)
        ends = {1: [(max(h, w) - side) // 2], 2: [0, max(h, w) - side]}[crops]
        for o in ends:
            square = clip[:, :, o:o + side] if h > w else clip[:, :, :, o:o + side]
            x = F.interpolate(square, size=(cfg.size, cfg.size), mode="bilinear", align_corners=False,
                              antialias=True)
            video = ((x / 255 - mean) / std).permute(1, 0, 2, 3)
            centre = (picked[0] + picked[-1] + 1) / 2 / 25.0
            out.append((video, audio_tensor(wave, inputs.audio, centre)))
    return out


def test_one_view_is_the_training_decoder(setup):
    folder, source, inputs, model = setup
    for record in source.records():
        video, audio = decode_record(record, inputs, "av")
        one_v, one_a = decode_views(record, inputs, "av", (1, 1))
        assert torch.equal(one_v[0], video) and torch.equal(one_a[0], audio)
        # The general view path at 1,1 (all frames decoded, window and crop placed here) is the same.
        gen_v, gen_a = _view_tensors(record, inputs, "av", 1, 1)
        torch.testing.assert_close(gen_v[0], video, atol=1e-6, rtol=0)
        torch.testing.assert_close(gen_a[0], audio, atol=1e-6, rtol=0)
    keys = [r.key for r in source.records()]
    logits, done, skipped = evaluate_logits(model, source, keys, inputs, "av", 4, 0, 1, CPU, (1, 1))
    assert done.all() and not skipped
    with torch.no_grad():
        today = torch.cat([model(*(t[None] for t in decode_record(r, inputs, "av")))
                           for r in source.records()])
    np.testing.assert_allclose(logits, today.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["files", "sample"])
def test_two_by_two_views_average_the_four_single_view_logits(setup, kind):
    folder, source, inputs, model = setup
    records = list(source.records())
    if kind == "sample":  # the same clips as WebDataset samples (mp4 + flac + json)
        records = [Record(r.key, label=r.label, sample=record_sample(r, inputs)) for r in records]
        source = type(source)("shards", "test", lambda: iter(records))
    keys = [r.key for r in records]
    logits, done, _ = evaluate_logits(model, source, keys, inputs, "av", 1, 0, 1, CPU, (2, 2))
    assert done.all()
    for row, name, record in zip(logits, ("wide", "tall"), records):
        sound = record.sample["flac"] if record.sample else None  # a sample's sound is its FLAC
        views = reference_views(folder / f"{name}.mp4", inputs, 2, 2, sound)
        assert len(views) == 4
        assert not torch.allclose(views[0][0], views[1][0]) and not torch.allclose(views[0][0], views[2][0])
        with torch.no_grad():
            single = [model(v[None], a[None])[0] for v, a in views]
        expected = torch.stack(single).mean(dim=0).numpy()
        np.testing.assert_allclose(row, expected, atol=1e-5, rtol=1e-4)
        assert not np.allclose(row, single[0].numpy(), atol=1e-6)  # the views differ: averaging matters
    preds, skipped = evaluate(model, source, keys, inputs, "av", 2, 0, 1, CPU, (2, 2))
    assert preds.tolist() == logits.argmax(axis=1).tolist() and not skipped


def test_views_video_only_and_audio_only(setup):
    folder, source, inputs, model = setup
    record = next(iter(source.records()))
    video, audio = decode_views(record, inputs, "video", (2, 2))
    assert audio is None and tuple(video.shape) == (4, 3, 4, 32, 32)
    video, audio = decode_views(record, inputs, "audio", (3, 2))
    assert video is None and audio.shape[0] == 3  # crops do not apply to sound: one per window
