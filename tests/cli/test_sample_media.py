from __future__ import annotations

from pathlib import Path

import av
import cv2
import dlib
import numpy as np
import pytest

from services.cli import sample_media
from services.common.errors import InvalidArgument
from services.common.media_probe import probe_media

FaceBox = tuple[int, int, int, int]  # left, top, right, bottom


@pytest.fixture(scope="module")
def face_boxes() -> dlib.fhog_object_detector:
    return dlib.get_frontal_face_detector()


def detect(detector: dlib.fhog_object_detector, image: np.ndarray) -> list[FaceBox]:
    return [(box.left(), box.top(), box.right(), box.bottom()) for box in detector(image, 0)]


def video_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_photos_are_rgb_portraits() -> None:
    astronaut, hopper = sample_media.astronaut_photo(), sample_media.grace_hopper_photo()
    assert astronaut.shape == (512, 512, 3) and hopper.shape == (600, 512, 3)
    assert astronaut.dtype == hopper.dtype == np.uint8
    # Skin and the orange suit: red dominates the astronaut photo, so channels are in RGB order.
    assert astronaut[..., 0].mean() > astronaut[..., 2].mean()


def test_encode_png_round_trips() -> None:
    photo = sample_media.grace_hopper_photo()
    decoded = cv2.imdecode(np.frombuffer(sample_media.encode_png(photo), np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB), photo)


@pytest.fixture(scope="module")
def default_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The defaults (720p, 25 fps, 1 s keyframes, audio), only shorter."""
    path = tmp_path_factory.mktemp("sample") / "astronaut.mp4"
    return sample_media.make_face_video(path, sample_media.astronaut_photo(), seconds=2.0)


def test_face_video_format(default_video: Path) -> None:
    info = probe_media(default_video)
    assert (info.kind, info.width, info.height, info.fps, info.frame_count) == ("video", 1280, 720, 25, 50)
    assert [key.frame_index for key in info.keyframes] == [0, 25]
    assert info.video_codec == "h264"
    with av.open(str(default_video)) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p"
        audio = container.streams.audio[0]
        assert audio.codec_context.name == "aac"
        assert audio.duration is not None and audio.time_base is not None
        assert float(audio.duration * audio.time_base) == pytest.approx(2.0, abs=0.05)


def test_face_video_moves_changes_light_and_keeps_the_face(
    default_video: Path, face_boxes: dlib.fhog_object_detector
) -> None:
    frames = video_frames(default_video)
    first, middle, last = frames[0], frames[len(frames) // 2], frames[-1]
    assert np.abs(first.astype(np.int16) - frames[12].astype(np.int16)).mean() > 5, "the camera moves"
    assert middle.mean() < 0.8 * first.mean(), "the light dims mid-way"
    assert last.mean() == pytest.approx(first.mean(), rel=0.05), "and comes back"
    red_to_blue = [frame[..., 0].mean() / frame[..., 2].mean() for frame in (frames[12], frames[37])]
    assert red_to_blue[0] > 1.1 * red_to_blue[1], "the colour cast shifts from warm to cool"
    boxes = []
    for frame in frames[::6]:
        # dlib also fires on the mission patch of the suit (about 100 px); the face is far larger.
        found = [box for box in detect(face_boxes, frame) if box[3] - box[1] >= 130]
        assert len(found) == 1
        boxes.append(found[0])
    for left, top, right, bottom in boxes:
        assert left > 0 and top > 0 and right < 1280 and bottom < 720
        # dlib's box spans brows to lips, about three quarters of the face's height.
        assert 140 <= bottom - top <= 270
    assert len(set(boxes)) > 3, "the face moves across the frame"


def test_face_video_is_deterministic(tmp_path: Path) -> None:
    photo = sample_media.astronaut_photo()
    paths = [sample_media.make_face_video(tmp_path / f"{n}.mp4", photo, seconds=0.4, size=(160, 96)) for n in range(4)]
    assert len({path.read_bytes() for path in paths}) == 1


def test_chord_audio_changes_every_second() -> None:
    samples = sample_media.chord_audio(2.0)
    assert samples.shape == (2, 2 * sample_media.AUDIO_SAMPLE_RATE)

    def loudest_hz(window: np.ndarray) -> float:
        spectrum = np.abs(np.fft.rfft(window))
        return float(np.fft.rfftfreq(len(window), 1 / sample_media.AUDIO_SAMPLE_RATE)[spectrum.argmax()])

    rate = sample_media.AUDIO_SAMPLE_RATE
    first, second = samples[0, : rate // 4], samples[0, rate : rate + rate // 4]
    assert loudest_hz(first) != pytest.approx(loudest_hz(second), abs=5)
    assert np.abs(samples).max() <= 1.0


def test_two_person_image(tmp_path: Path, face_boxes: dlib.fhog_object_detector) -> None:
    path = tmp_path / "two.png"
    image = sample_media.make_two_person_image(path)
    assert image.shape == (720, 1280, 3)
    written = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    assert np.array_equal(written, image)
    found = sorted(detect(face_boxes, image))
    assert len(found) == 2
    (left_face, right_face) = found
    assert left_face[2] < 640 < right_face[0]
    widths = [right - left for left, _, right, _ in found]
    assert max(widths) / min(widths) < 1.25
    assert np.array_equal(image[5, 5], sample_media.NEUTRAL_GREY)


def test_bad_inputs_cannot_be_probed(default_video: Path, tmp_path: Path) -> None:
    not_media = sample_media.make_not_media_file(tmp_path / "notes.mp4")
    with pytest.raises(InvalidArgument, match="not a video or image"):
        probe_media(not_media)
    truncated = sample_media.make_truncated_mp4(default_video, tmp_path / "cut.mp4")
    assert 0 < truncated.stat().st_size < default_video.stat().st_size
    with pytest.raises(InvalidArgument, match="truncated or corrupt"):
        probe_media(truncated)


def test_group_image_shows_six_faces_in_every_frame_of_the_camera_move(face_boxes: dlib.fhog_object_detector) -> None:
    size = (1920, 1080)
    group = sample_media.make_group_image(size)
    assert group.shape == (1080, 1920, 3)
    backdrop = sample_media._blurred_backdrop(group, size)
    for progress in (0.0, 0.25, 0.5, 0.75):
        frame = sample_media.render_face_frame(group, backdrop, size, progress)
        small = cv2.resize(frame, (960, 540), interpolation=cv2.INTER_AREA)
        assert len(detect(face_boxes, small)) == 6, progress
