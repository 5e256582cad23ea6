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

Skipping what no wanted frame needs (`wanted`). Given the frame indices the caller wants, a packet
whose frame is not wanted and that no other frame references is not decoded at all: in H.264 a
picture whose slices all have nal_ref_idc 0 (x264's non-reference B-frames: about half of all frames
with its default 3 B-frames, and every one of them off a stride-4 window's lattice). Dropping a
non-reference picture changes no other picture's bits, so every frame still decoded is the one a full
decode gives (tests/data/test_seek.py compares them). It needs the same timestamp proof as a seek (an
index for every packet before decoding) and H.264 in its length-prefixed form (mp4, Matroska); other
codecs, and streams the proof fails on, decode every frame. The stream's last frame is always decoded
(a clip shorter than promised lends it to the frames it lacks).

The container must be freshly opened (nothing demuxed or decoded from it yet). A demuxing error part
way is raised after the frames of the packets read before it, as a sequential decode would.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from fractions import Fraction

import av

# A frame's pts may sit up to this many time-base ticks off the fps grid (containers round times to
# their time base, e.g. 30 fps in Matroska's milliseconds), and never more than this fraction of a frame.
GRID_TOLERANCE_TICKS = 1
MAX_GRID_ERROR_FRAMES = Fraction(1, 4)


def frames_from(container: av.container.InputContainer, stream: av.video.stream.VideoStream, first: int,
                fps: float, wanted: Collection[int] | None = None) -> Iterator[tuple[int, av.VideoFrame]]:
    """Yield `(index, frame)` in index order from the keyframe at or before frame `first` to the end of
    the stream.

    `index` is the frame's position in a sequential decode from the start; the first index yielded is
    <= `first` (0 when no keyframe after frame 0 qualifies, or when the stream's timestamps cannot prove
    the indices: then everything is decoded from the start). Stop iterating once the frames you need
    are out. `fps` is the stream's frame rate (what the caller takes as its rate). With `wanted`, frames
    outside it that no other frame needs may be left undecoded (never yielded); every wanted frame from
    the start index on is yielded, and so is the stream's last frame.
    """
    if first < 0:
        raise ValueError(f"first must be >= 0, got {first}")
    packets, error = _read_packets(container, stream)
    plan = _plan(packets, stream, first, fps, wanted) if error is None else None
    if plan is None:
        yield from _sequential(packets, 0)
    else:
        chosen, order, grid = plan
        promised = iter(order)
        expected = next(promised, None)
        index = order[0] if order else 0
        for packet in chosen:
            for frame in packet.decode():
                if expected is None or frame.pts is None or grid_index(frame.pts, grid) != expected:
                    # Not what the packets promised: decode again from the start, skipping what is out.
                    stream.codec_context.flush_buffers()
                    yield from _sequential(packets, index)
                    return
                yield expected, frame
                index = expected + 1
                expected = next(promised, None)
    if error is not None:
        raise error


def _plan(packets: Sequence[av.Packet], stream: av.video.stream.VideoStream, first: int, fps: float,
          wanted: Collection[int] | None) -> tuple[list[av.Packet], list[int], tuple[int, int, int]] | None:
    """(the packets to decode, in decode order and ending with the flush packet if there is one; the
    frame indices they show, ascending; grid), or None to decode every packet from the start (nothing
    to seek past and nothing to leave out, or timestamps that do not prove the indices)."""
    nal_length = h264_nal_length(stream) if wanted is not None else None
    frames = [p for p in packets if p.size]
    # Cheap first: nothing to leave out and no keyframe after the first frame: nothing to verify.
    if nal_length is None and (first <= 0 or not any(p.is_keyframe for p in frames[1:])):
        return None
    proof = prove_indices(packets, stream, fps)
    if proof is None:
        return None
    positions, indices, grid = proof
    position, start = _keyframe_at_or_before(packets, positions, indices, first)
    if nal_length is None and start == 0:
        return None  # no seek and nothing to leave out: a plain sequential decode
    keep = set(wanted or ()) | {len(indices) - 1}  # the last frame: a short clip lends it to the rest
    chosen, order = [], []
    for p, k in zip(positions, indices, strict=True):
        if p >= position and (nal_length is None or k in keep or not disposable(packets[p], nal_length)):
            chosen.append(packets[p])
            order.append(k)
    tail = [p for p in packets[-1:] if not p.size]  # the demuxer's empty flush packet drains the decoder
    return chosen + tail, sorted(order), grid


def _keyframe_at_or_before(packets: Sequence[av.Packet], positions: list[int], indices: list[int],
                           first: int) -> tuple[int, int]:
    """(packet position, frame index) of the latest closed-GOP keyframe at or before frame `first`,
    (positions[0], 0) if none after frame 0 qualifies. A keyframe qualifies when no packet after it (in
    decode order) shows an earlier frame and none before it a later one."""
    n = len(indices)
    later_min = [0] * n  # smallest index shown by packets from position i on
    low = n
    for i in range(n - 1, -1, -1):
        low = min(low, indices[i])
        later_min[i] = low
    best = (positions[0], 0)
    earlier_max = -1  # largest index shown by packets before position i
    for i, k in enumerate(indices):
        if 0 < k <= first and packets[positions[i]].is_keyframe and later_min[i] == k and earlier_max < k:
            best = (positions[i], k)
        earlier_max = max(earlier_max, k)
    return best


def start_packet(packets: Sequence[av.Packet], stream: av.video.stream.VideoStream, first: int,
                 fps: float) -> tuple[int, int, tuple[int, int, int]] | None:
    """Where to start decoding for frame `first`: (packet position, frame index of that keyframe,
    grid), or None to decode from the start (no qualifying keyframe after frame 0 at or before
    `first`, or timestamps that do not prove the indices): `frames_from`'s plan without `wanted`."""
    plan = _plan(packets, stream, first, fps, None)
    if plan is None:
        return None
    chosen, order, grid = plan
    return next(i for i, p in enumerate(packets) if p is chosen[0]), order[0], grid


def prove_indices(packets: Sequence[av.Packet], stream: av.video.stream.VideoStream, fps: float
                  ) -> tuple[list[int], list[int], tuple[int, int, int]] | None:
    """(positions of the packets that show a frame, the frame index each shows, grid) when the packets'
    presentation times put every frame on the grid of `fps` from the stream's start, once each, with no
    gap and no discarded packet; None otherwise. `grid` is (start pts, ticks per frame as numerator,
    denominator): integers, so the per-frame checks cost well under a microsecond."""
    # The demuxer's last, empty packet (it flushes the decoder) shows no frame.
    positions = [i for i, p in enumerate(packets) if p.size]
    frames = [packets[i] for i in positions]
    if not frames or fps <= 0 or stream.time_base is None:
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
    indices = [grid_index(p.pts, grid) for p in frames]
    if None in indices or sorted(indices) != list(range(len(frames))):  # type: ignore[type-var]
        return None  # off the grid, a gap, or a frame twice: only a sequential count is exact
    return positions, indices, grid  # type: ignore[return-value]


def h264_nal_length(stream: av.video.stream.VideoStream) -> int | None:
    """The size in bytes of the NAL length prefixes of an H.264 stream stored length-prefixed (an avcC
    record in its extradata: mp4, Matroska), None for other codecs and Annex B streams."""
    if stream.codec_context.name != "h264":
        return None
    extra = stream.codec_context.extradata
    if not extra or len(extra) < 7 or extra[0] != 1:  # avcC starts with configurationVersion 1
        return None
    return (extra[4] & 3) + 1


def disposable(packet: av.Packet, nal_length: int) -> bool:
    """Whether an H.264 packet (length-prefixed NAL units) holds a picture no other picture references:
    it has slices and every slice NAL unit's nal_ref_idc is 0. False when the packet does not parse
    exactly into NAL units."""
    data = bytes(packet)
    pos, slices = 0, 0
    while pos < len(data):
        if pos + nal_length >= len(data):
            return False
        size = int.from_bytes(data[pos : pos + nal_length], "big")
        pos += nal_length
        if size == 0 or pos + size > len(data):
            return False
        header = data[pos]
        kind = header & 0x1F
        if kind in (1, 2, 3, 4, 5, 20):  # coded slices (and their extension): they decide
            if header & 0x60:
                return False
            slices += 1
        pos += size
    return slices > 0


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
