"""Sample media made from package-shipped photos: face videos, a two-person frame and bad inputs.

Everything here is deterministic: the same arguments give the same pixels and the same audio, so
tests, `make demo` and benchmarks all see identical input.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

Image = np.ndarray  # (height, width, 3) uint8 RGB

AUDIO_SAMPLE_RATE = 48000
AUDIO_FRAME_SAMPLES = 1024  # the AAC encoder's frame size
# A I-vi-IV-V progression (C, Am, F, G), one chord per second, looping.
CHORD_PROGRESSION_HZ: tuple[tuple[float, ...], ...] = (
    (261.63, 329.63, 392.00),
    (220.00, 261.63, 329.63),
    (174.61, 220.00, 261.63),
    (196.00, 246.94, 293.66),
)

# Where the camera looks in a portrait photo (fractions of width and height) and how tall the
# photo is drawn relative to the frame: for the packaged portraits this puts the face at
# roughly 200-330 px of a 720 px frame.
PORTRAIT_FOCUS = (0.5, 0.35)
PORTRAIT_FILL = 1.15
ZOOM_RANGE = 0.12
PAN_FRACTION = (0.04, 0.03)
ROTATION_DEGREES = 3.0
DARKEST_BRIGHTNESS = 0.6
COLOUR_CAST = 0.12

# Head-and-shoulders crops (x0, y0, x1, y1) of the packaged photos, measured with dlib's face
# detector: the astronaut's face box is about 90 px wide, Grace Hopper's about 186 px.
ASTRONAUT_PORTRAIT = (100, 0, 340, 300)
ASTRONAUT_FACE_WIDTH = 90
GRACE_HOPPER_PORTRAIT = (16, 0, 512, 600)
GRACE_HOPPER_FACE_WIDTH = 186
TWO_PERSON_FACE_WIDTH = 150
NEUTRAL_GREY = (196, 196, 192)


def astronaut_photo() -> Image:
    """Eileen Collins, scikit-image's `data.astronaut()`: 512x512 RGB."""
    from skimage import data

    return np.ascontiguousarray(data.astronaut(), dtype=np.uint8)


def grace_hopper_photo() -> Image:
    """Grace Hopper, matplotlib's sample_data/grace_hopper.jpg: 512 wide, 600 high RGB."""
    from matplotlib import cbook
    from matplotlib import image as mpl_image

    photo = mpl_image.imread(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    return np.ascontiguousarray(photo[..., :3], dtype=np.uint8)


def encode_png(image: Image) -> bytes:
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"could not encode a {image.shape} image as PNG")
    return encoded.tobytes()


def _blurred_backdrop(photo: Image, size: tuple[int, int]) -> Image:
    """A soft, dimmed stretch of the photo: fills the frame around it without adding a face."""
    width, height = size
    tiny = cv2.resize(photo, (16, 9), interpolation=cv2.INTER_AREA)
    backdrop = cv2.resize(tiny, (width, height), interpolation=cv2.INTER_CUBIC)
    return cv2.GaussianBlur(backdrop, (0, 0), sigmaX=width / 40) // 2 + 40


def _camera_matrix(photo_shape: tuple[int, ...], size: tuple[int, int], progress: float) -> np.ndarray:
    """Photo -> frame transform at `progress` in [0, 1]: zoom in then out, pan, slight roll."""
    width, height = size
    photo_height, photo_width = photo_shape[:2]
    zoom = 1.0 + ZOOM_RANGE * math.sin(math.pi * progress)
    scale = PORTRAIT_FILL * height / photo_height * zoom
    angle = ROTATION_DEGREES * math.sin(2 * math.pi * progress)
    focus = (PORTRAIT_FOCUS[0] * photo_width, PORTRAIT_FOCUS[1] * photo_height)
    matrix = cv2.getRotationMatrix2D(focus, angle, scale)
    pan_x = PAN_FRACTION[0] * width * math.sin(2 * math.pi * progress)
    pan_y = PAN_FRACTION[1] * height * math.sin(2 * math.pi * progress + math.pi / 3)
    matrix[0, 2] += width / 2 + pan_x - focus[0]
    matrix[1, 2] += height / 2 + pan_y - focus[1]
    return matrix


def _lighting_matrix(progress: float) -> np.ndarray:
    """Per-channel gains: brightness falls to DARKEST_BRIGHTNESS and back; the cast goes warm, then cool."""
    brightness = 1.0 - (1.0 - DARKEST_BRIGHTNESS) * (1.0 - math.cos(2 * math.pi * progress)) / 2
    cast = COLOUR_CAST * math.sin(2 * math.pi * progress)
    return np.diag([brightness * (1 + cast), brightness, brightness * (1 - cast)]).astype(np.float32)


def render_face_frame(photo: Image, backdrop: Image, size: tuple[int, int], progress: float) -> Image:
    """One frame of the face video at `progress` in [0, 1]."""
    frame = backdrop.copy()
    cv2.warpAffine(
        photo,
        _camera_matrix(photo.shape, size, progress),
        size,
        dst=frame,
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_TRANSPARENT,
    )
    return cv2.transform(frame, _lighting_matrix(progress))


def chord_audio(seconds: float, sample_rate: int = AUDIO_SAMPLE_RATE) -> np.ndarray:
    """(2, samples) float32 stereo: one chord a second with smooth crossfades, the right channel softer."""
    times = np.arange(round(seconds * sample_rate), dtype=np.float64) / sample_rate
    mono = np.zeros_like(times)
    for slot, chord in enumerate(CHORD_PROGRESSION_HZ):
        # A raised-cosine window per second of the cycle; neighbouring windows sum to one.
        phase = (times - slot) % len(CHORD_PROGRESSION_HZ)
        distance = np.minimum(phase, len(CHORD_PROGRESSION_HZ) - phase)
        weight = np.where(distance < 1.0, 0.5 * (1 + np.cos(np.pi * np.clip(distance, 0, 1))), 0.0)
        tone = sum(np.sin(2 * np.pi * hz * times) for hz in chord) / len(chord)
        mono += weight * tone
    mono *= 0.3
    return np.stack([mono, 0.8 * mono]).astype(np.float32)


def _encode_audio(
    container: av.container.OutputContainer,
    stream: av.audio.stream.AudioStream,
    samples: np.ndarray,
    start: int,
    stop: int,
) -> int:
    """Encodes whole AAC frames of samples[:, start:stop]; returns where it stopped."""
    position = start
    while position + AUDIO_FRAME_SAMPLES <= stop or (stop == samples.shape[1] and position < stop):
        chunk = np.ascontiguousarray(samples[:, position : position + AUDIO_FRAME_SAMPLES])
        if chunk.shape[1] < AUDIO_FRAME_SAMPLES:
            chunk = np.pad(chunk, ((0, 0), (0, AUDIO_FRAME_SAMPLES - chunk.shape[1])))
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
        frame.sample_rate = AUDIO_SAMPLE_RATE
        frame.time_base = Fraction(1, AUDIO_SAMPLE_RATE)
        frame.pts = position
        container.mux(stream.encode(frame))
        position += AUDIO_FRAME_SAMPLES
    return position


def make_face_video(
    path: Path,
    photo: Image,
    seconds: float = 5.0,
    size: tuple[int, int] = (1280, 720),
    fps: int = 25,
    keyframe_seconds: float = 1.0,
    audio: bool = True,
    crf: int = 23,
) -> Path:
    """Writes an H.264 MP4 of `photo` under camera motion and changing light, with a chord track.

    size is (width, height). Keyframes fall exactly every keyframe_seconds (fixed GOP, no
    scene-cut keyframes), so chunking at keyframes gives evenly sized chunks.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame_count = round(seconds * fps)
    gop = max(1, round(keyframe_seconds * fps))
    backdrop = _blurred_backdrop(photo, size)
    samples = chord_audio(frame_count / fps)
    with av.open(str(path), "w", format="mp4") as container:
        video = container.add_stream(
            "libx264",
            rate=fps,
            options={
                "crf": str(crf),
                "preset": "veryfast",
                # mbtree=0: with macroblock-tree rate control this libx264 build's output differs
                # between identical runs, and sample media must be reproducible byte for byte.
                "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:mbtree=0",
            },
        )
        video.width, video.height = size
        video.pix_fmt = "yuv420p"
        video.codec_context.gop_size = gop
        audio_stream = container.add_stream("aac", rate=AUDIO_SAMPLE_RATE, layout="stereo") if audio else None
        audio_position = 0
        for index in range(frame_count):
            progress = index / max(frame_count - 1, 1)
            picture = render_face_frame(photo, backdrop, size, progress)
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts = index
            container.mux(video.encode(frame))
            if audio_stream is not None:
                due = min(samples.shape[1], (index + 1) * AUDIO_SAMPLE_RATE // fps)
                audio_position = _encode_audio(container, audio_stream, samples, audio_position, due)
        container.mux(video.encode(None))
        if audio_stream is not None:
            _encode_audio(container, audio_stream, samples, audio_position, samples.shape[1])
            container.mux(audio_stream.encode(None))
    return path


def _portrait(
    photo: Image, crop: tuple[int, int, int, int], face_width: int, drawn_face_width: int = TWO_PERSON_FACE_WIDTH
) -> Image:
    x0, y0, x1, y1 = crop
    scale = drawn_face_width / face_width
    region = photo[y0:y1, x0:x1]
    return cv2.resize(
        region,
        (round(region.shape[1] * scale), round(region.shape[0] * scale)),
        interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC,
    )


def make_two_person_image(path: Path | None = None, size: tuple[int, int] = (1280, 720)) -> Image:
    """The astronaut (left half) and Grace Hopper (right half), faces of equal size, on neutral grey."""
    width, height = size
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = NEUTRAL_GREY
    people = (
        _portrait(astronaut_photo(), ASTRONAUT_PORTRAIT, ASTRONAUT_FACE_WIDTH),
        _portrait(grace_hopper_photo(), GRACE_HOPPER_PORTRAIT, GRACE_HOPPER_FACE_WIDTH),
    )
    half = width // 2
    for slot, person in enumerate(people):
        person = person[:height, :half]
        top = (height - person.shape[0]) // 2
        left = slot * half + (half - person.shape[1]) // 2
        canvas[top : top + person.shape[0], left : left + person.shape[1]] = person
    if path is not None:
        Path(path).write_bytes(encode_png(canvas))
    return canvas


# The part of a frame-sized photo that make_face_video's camera keeps in view all along (its zoom, pan and
# roll about PORTRAIT_FOCUS), as fractions (x0, y0, x1, y1): a group drawn inside it stays whole.
GROUP_VIEW = (0.13, 0.04, 0.87, 0.72)


def make_group_image(size: tuple[int, int] = (1920, 1080), columns: int = 3, rows: int = 2) -> Image:
    """columns x rows people on neutral grey, inside the camera's view when used as make_face_video's photo.

    The packages ship two portraits, so the group alternates them, every other pair mirrored: six
    faces a frame for a detector and a swapper to work through, not six identities.
    """
    width, height = size
    extents = (width, height, width, height)
    x0, y0, x1, y1 = (round(fraction * extent) for fraction, extent in zip(GROUP_VIEW, extents, strict=True))
    cell_width, cell_height = (x1 - x0) // columns, (y1 - y0) // rows
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = NEUTRAL_GREY
    face_width = cell_width * 2 // 5
    portraits = (
        _portrait(astronaut_photo(), ASTRONAUT_PORTRAIT, ASTRONAUT_FACE_WIDTH, face_width),
        _portrait(grace_hopper_photo(), GRACE_HOPPER_PORTRAIT, GRACE_HOPPER_FACE_WIDTH, face_width),
    )
    for slot in range(columns * rows):
        person = portraits[slot % 2]
        if (slot // 2) % 2:
            person = person[:, ::-1]
        person = person[:cell_height, :cell_width]
        row, column = divmod(slot, columns)
        top = y0 + row * cell_height
        left = x0 + column * cell_width + (cell_width - person.shape[1]) // 2
        canvas[top : top + person.shape[0], left : left + person.shape[1]] = person
    return canvas


def make_not_media_file(path: Path) -> Path:
    Path(path).write_text("This is a plain text file, not a video or an image.\n" * 20)
    return Path(path)


def _top_level_box_offset(data: bytes, box_type: bytes) -> int | None:
    """Offset of the first top-level ISO BMFF box of `box_type`, or None."""
    offset = 0
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset : offset + 4], "big")
        kind = data[offset + 4 : offset + 8]
        if kind == box_type:
            return offset
        if size == 1 and offset + 16 <= len(data):
            size = int.from_bytes(data[offset + 8 : offset + 16], "big")
        if size < 8:
            return None
        offset += size
    return None


def make_truncated_mp4(source_mp4: Path, path: Path) -> Path:
    """Keeps the first half of the file and nothing from its index (moov box) on: unreadable."""
    data = Path(source_mp4).read_bytes()
    cut = len(data) // 2
    index_offset = _top_level_box_offset(data, b"moov")
    if index_offset is not None:
        cut = min(cut, index_offset)
    Path(path).write_bytes(data[:cut])
    return Path(path)
