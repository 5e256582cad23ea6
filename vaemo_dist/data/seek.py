"""Decode a video from the keyframe at or before a wanted frame, with a sequential decode's frame indices.

`frames_from(container, stream, first, fps)` yields `(index, frame)` where `index` is exactly the
position the frame has in a sequential decode from the start (frame n = the n-th decoded frame), and
the first yielded index is at or before `first`. When the clip has a usable keyframe after frame 0 at
or before `first`, decoding starts there and the frames before it are never decoded: with short GOPs
(`vaemo-shard --keyint`) a window in the middle of a long clip costs only its own frames plus at
most one GOP.

How it stays exact. The stream's packets are read first (demuxing only, no decoding: ~5 us a packet
in memory). Their presentation times must put every frame on the grid of `fps` from the stream's
start (within one time-base tick), once each, with no gap and no discarded packet: then a frame's
index from its pts is its index in a sequential decode. A keyframe qualifies when no packet after it
(in decode order) shows an earlier frame and none before it a later one (a closed GOP: no leading
pictures that need the previous GOP). Decoding then starts at that keyframe's packet — a seek done at
packet level, on the packets already read, so no container index (mp4 `stss`, WebM cues) is needed
and nothing is read twice. Every decoded frame's pts is checked against the index it must have; on
the first mismatch the decoder is flushed and the clip is decoded again from its first packet,
yielding only frames not yet yielded. Streams without pts, off the grid (variable frame rate) or with
odd reordering are decoded from the start, as `container.decode(stream)` would.

The container must be freshly opened (nothing demuxed or decoded from it yet). A demuxing error part
way is raised after the frames of the packets read before it, as a sequential decode would.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from fractions import Fraction

import av

# A frame's pts may sit up to this many time-base ticks off the fps grid (containers round times to
# their time base, e.g. 30 fps in Matroska's milliseconds), and never more than this fraction of a frame.
GRID_TOLERANCE_TICKS = 1
MAX_GRID_ERROR_FRAMES = Fraction(1, 4)


def frames_from(container: av.container.InputContainer, stream: av.video.stream.VideoStream, first: int,
                fps: float) -> Iterator[tuple[int, av.VideoFrame]]:
    """Yield `(index, frame)` from the keyframe at or before frame `first` to the end of the stream.

    `index` is the frame's position in a sequential decode from the start; the first index yielded is
    <= `first` (0 when no keyframe after frame 0 qualifies, or when the stream's timestamps cannot prove
    the indices: then everything is decoded from the start). Stop iterating once the frames you need
    are out. `fps` is the stream's frame rate (what the caller takes as its rate).
    """
    if first < 0:
        raise ValueError(f"first must be >= 0, got {first}")
    packets, error = _read_packets(container, stream)
    plan = start_packet(packets, stream, first, fps) if error is None else None
    if plan is None:
        yield from _sequential(packets, 0)
    else:
        position, index, grid = plan
        expected = index
        for packet in packets[position:]:
            for frame in packet.decode():
                if frame.pts is None or grid_index(frame.pts, grid) != expected:
                    # Not what the packets promised: decode again from the start, skipping what is out.
                    stream.codec_context.flush_buffers()
                    yield from _sequential(packets, expected)
                    return
                yield expected, frame
                expected += 1
    if error is not None:
        raise error


def start_packet(packets: Sequence[av.Packet], stream: av.video.stream.VideoStream, first: int,
                 fps: float) -> tuple[int, int, tuple[int, int, int]] | None:
    """Where to start decoding for frame `first`: (packet position, frame index of that keyframe,
    grid), or None to decode from the start (no qualifying keyframe after frame 0 at or before
    `first`, or timestamps that do not prove the indices). `grid` is (start pts, ticks per frame as
    numerator, denominator): integers, so the per-packet checks cost well under a microsecond."""
    # The demuxer's last, empty packet (it flushes the decoder) shows no frame.
    positions = [i for i, p in enumerate(packets) if p.size]
    frames = [packets[i] for i in positions]
    if first <= 0 or not frames or fps <= 0 or stream.time_base is None:
        return None
    if any(p.pts is None or p.is_discard or p.is_corrupt for p in frames):
        return None
    start = min(p.pts for p in frames)
    if stream.start_time is not None and stream.start_time != start:
        return None  # an edit list or skipped leading frames: the first decoded frame is not the first pts
    ticks = 1 / (Fraction(fps).limit_denominator(1_000_000) * Fraction(stream.time_base))
    if ticks * MAX_GRID_ERROR_FRAMES < GRID_TOLERANCE_TICKS:
        return None  # a time base too coarse to tell neighbouring frames apart
    grid = (start, ticks.numerator, ticks.denominator)
    # Cheap first: without a keyframe after the first frame and up to `first` there is nothing to verify.
    limit = math.floor(start + (first + Fraction(1, 2)) * ticks)  # past frame `first`, before `first + 1`
    if not any(p.is_keyframe and start < p.pts <= limit for p in frames):
        return None
    indices = [grid_index(p.pts, grid) for p in frames]
    if None in indices or sorted(indices) != list(range(len(frames))):  # type: ignore[type-var]
        return None  # off the grid, a gap, or a frame twice: only a sequential count is exact
    n = len(frames)
    later_min = [0] * n  # smallest index shown by packets from position i on
    low = n
    for i in range(n - 1, -1, -1):
        low = min(low, indices[i])  # type: ignore[type-var]
        later_min[i] = low
    best: tuple[int, int] | None = None
    earlier_max = -1  # largest index shown by packets before position i
    for i, (p, k) in enumerate(zip(frames, indices)):
        assert k is not None
        if 0 < k <= first and p.is_keyframe and later_min[i] == k and earlier_max < k:
            best = (i, k)
        earlier_max = max(earlier_max, k)
    if best is None:
        return None
    return positions[best[0]], best[1], grid


def grid_index(pts: int, grid: tuple[int, int, int]) -> int | None:
    """The frame index of `pts` on `grid` (start pts, ticks per frame as numerator, denominator), or
    None if it is off the grid (more than GRID_TOLERANCE_TICKS from the nearest frame time)."""
    start, num, den = grid
    scaled = (pts - start) * den  # in 1/den ticks: a frame is `num` of them
    k = (2 * scaled + num) // (2 * num)  # the nearest index
    if k < 0 or abs(scaled - k * num) > GRID_TOLERANCE_TICKS * den:
        return None
    return k


def _read_packets(container: av.container.InputContainer,
                  stream: av.video.stream.VideoStream) -> tuple[list[av.Packet], av.FFmpegError | None]:
    """Every packet of `stream` in decode order (the flush packet last), and the demuxing error that
    cut the list short, if one did."""
    packets: list[av.Packet] = []
    try:
        for packet in container.demux(stream):
            packets.append(packet)
    except av.FFmpegError as e:
        return packets, e
    return packets, None


def _sequential(packets: Sequence[av.Packet], skip_below: int) -> Iterator[tuple[int, av.VideoFrame]]:
    """Decode `packets` from the first, counting frames; yield those with index >= `skip_below`."""
    index = 0
    for packet in packets:
        for frame in packet.decode():
            if index >= skip_below:
                yield index, frame
            index += 1
