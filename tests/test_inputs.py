"""Every malformed input gets a clear message naming the file and the problem, at library and app level,
and the app keeps answering good requests afterwards."""

import numpy as np
import pytest
from PIL import Image

import app
from winclip.images import MAX_FILE_BYTES, load_image, to_rgb
from winclip.prompting import build_ensemble
from winclip.service import DetectionService, DetectOptions, Settings

from conftest import TINY_CONFIG, serve
from corpus import bad_images, good_images, write

BAD = bad_images()
GOOD = good_images()


@pytest.fixture(scope="module")
def service():
    s = DetectionService(Settings(model=TINY_CONFIG, pretrained=None, precision="fp32"))
    assert s.load(), s.error
    return s


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    return {case: write(d, f"{case}-{name}", data) for case, name, data, *_ in BAD + GOOD}


def test_corpus_is_large_enough():
    assert len(BAD) >= 30 and len(BAD) + len(TEXT_CASES) >= 40


@pytest.mark.parametrize("case, name, data, message", BAD, ids=[c[0] for c in BAD])
def test_library_rejects_bad_image(files, case, name, data, message):
    with pytest.raises(ValueError, match=message) as info:
        load_image(files[case])
    assert str(files[case]) in str(info.value)  # names the file


@pytest.mark.parametrize("case, name, data, size, note", GOOD, ids=[c[0] for c in GOOD])
def test_library_loads_unusual_images(files, case, name, data, size, note):
    loaded = load_image(files[case])
    assert loaded.image.mode == "RGB" and loaded.image.size == size
    if note:
        assert any(note in n for n in loaded.notes)
    else:
        assert loaded.notes == ()


def test_high_bit_depth_keeps_its_range():
    gray16 = Image.fromarray(np.array([[0, 65535], [1000, 30000]], dtype=np.uint16), mode="I;16")
    values = np.asarray(to_rgb(gray16))[..., 0]
    assert values.min() == 0 and values.max() == 255  # scaled, not clipped to 255 at value 255


def test_file_size_cap(tmp_path):
    big = tmp_path / "big.png"
    with open(big, "wb") as fh:
        fh.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(ValueError, match="MB"):
        load_image(big)


@pytest.mark.parametrize("case, name, data, message", BAD, ids=[c[0] for c in BAD])
def test_service_rejects_bad_query_and_reference(service, files, case, name, data, message):
    good = files["mode-L"]
    with pytest.raises(ValueError, match=message) as info:
        service.detect(str(files[case]), [], DetectOptions())
    assert "query image" in str(info.value)
    with pytest.raises(ValueError, match=message) as info:
        service.detect(str(good), [str(good), str(files[case])], DetectOptions())
    assert "reference image 2" in str(info.value)


def test_mixed_size_and_unusual_references_work(service, files):
    refs = [str(files[c]) for c in ("mode-I16", "exif-rotated", "animated-gif", "mode-CMYK-jpeg")]
    r = service.detect(str(files["mode-RGBA"]), refs, DetectOptions())
    assert r.shots == 4 and 0 <= r.score <= 1
    assert any("first frame" in n for n in r.notes)


TEXT_CASES = [
    ({"object_name": "x" * 201}, "characters"),
    ({"object_name": "x1y2z3 " * 28}, "tokens"),
    ({"defect_words": ("a" * 300,)}, "characters"),
    ({"defect_words": tuple(f"defect{i}" for i in range(33))}, "at most 32"),
    ({"defect_words": ("{} and {}",)}, "at most once"),
    ({"templates": ("no placeholder",)}, "placeholder"),
    ({"templates": ("{} {}",)}, "placeholder"),
    ({"templates": tuple(f"photo {i} of {{}}" for i in range(65))}, "at most 64"),
    ({"normal_states": ("fine",)}, "placeholder"),
    ({"anomalous_states": ("y" * 250 + " {}",)}, "characters"),
    ({"threshold": -0.1}, "threshold"),
    ({"threshold": 1.5}, "threshold"),
    ({"max_window": 7}, "patch grid"),
    ({"min_window": 4, "max_window": 2}, "smallest first"),
]


@pytest.mark.parametrize("kwargs, message", TEXT_CASES, ids=[str(i) for i in range(len(TEXT_CASES))])
def test_bad_text_and_settings_rejected(service, files, kwargs, message):
    with pytest.raises(ValueError, match=message):
        service.detect(str(files["mode-L"]), [], DetectOptions(**kwargs))


def test_odd_but_valid_text(service, files):
    for object_name, words in [("", ()), ("🔩 bolt ✨", ("рыжая ржавчина", "缺陷")), ("part {0} {}", ("{x}",)),
                               ("bottle", ("crack", "crack", " crack ", "")), ("   ", ("bad soldering {}",))]:
        r = service.detect(str(files["mode-L"]), [], DetectOptions(object_name=object_name, defect_words=words))
        assert 0 <= r.score <= 1
    assert build_ensemble("").normal[0].endswith("object.")
    assert len(build_ensemble("b", ["crack", "crack", " crack "]).anomalous) == 5 * 22


def test_more_than_four_references(service, files):
    with pytest.raises(ValueError, match="at most 4"):
        service.detect(str(files["mode-L"]), [str(files["mode-L"])] * 5, DetectOptions())


@pytest.fixture(scope="module")
def client(service):
    from gradio_client import Client

    with serve(app.build_demo(service)) as url:
        yield Client(url, verbose=False, ssl_verify=False)


@pytest.mark.parametrize("case, name, data, message", BAD, ids=[c[0] for c in BAD])
def test_app_answers_bad_image_with_a_message(client, files, case, name, data, message):
    from gradio_client import handle_file

    with pytest.raises(Exception, match=message) as info:
        client.predict(handle_file(str(files[case])), [], api_name="/detect")
    assert "Traceback" not in str(info.value)


def test_app_bad_text_and_too_many_shots(client, files):
    from gradio_client import handle_file

    query = handle_file(str(files["mode-L"]))
    with pytest.raises(Exception, match="at most 4"):
        client.predict(query, [handle_file(str(files["mode-L"]))] * 5, api_name="/detect")
    with pytest.raises(Exception, match="tokens"):
        client.predict(query, [], "x1y2z3 " * 28, api_name="/detect")
    with pytest.raises(Exception, match="Upload a query"):
        client.predict(None, [], api_name="/detect")


def test_app_still_serves_after_the_corpus(client, files):
    from gradio_client import handle_file

    label, verdict, overlay, mask, gallery = client.predict(
        handle_file(str(files["mode-RGBA"])), [handle_file(str(files["mode-P"])), handle_file(str(files["bmp"]))],
        "washer", "crack", api_name="/detect")
    assert "2-shot" in verdict
    with Image.open(overlay) as im:
        assert im.size == (80, 60)


def test_ahead_in_a_thread_keeps_the_thread_state_raises_and_stops_when_closed():
    """Rows of a batch come from a thread of their own: what the source sets up for its thread holds for
    every item whichever thread asks, the caller's contextvars are seen there, an error is raised to the
    consumer, and closing stops the source before its next item."""
    import contextvars
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from winclip.inputs import ahead_in_a_thread

    local, var = threading.local(), contextvars.ContextVar("var", default="unset")
    made = []

    def source():
        local.precision = "fp32"  # set once, like a run's thread-local precision
        for i in range(100):
            made.append(i)
            yield (i, local.precision, var.get(), threading.current_thread().name)

    var.set("the caller's")
    stream = ahead_in_a_thread(source, 2, "winclip-test")
    first = next(stream)
    with ThreadPoolExecutor(1) as other:
        second = other.submit(next, stream).result()
    assert first[:3] == (0, "fp32", "the caller's") and second[:3] == (1, "fp32", "the caller's")
    assert first[3] == second[3] == "winclip-test"
    stream.close()
    assert len(made) <= 2 + 2 + 1  # read, queued, under way: then it stopped
    assert not any(t.name == "winclip-test" for t in threading.enumerate())

    def failing():
        yield 1
        raise ValueError("file 2 is broken")

    stream = ahead_in_a_thread(failing, 2, "winclip-test")
    assert next(stream) == 1
    with pytest.raises(ValueError, match="file 2 is broken"):
        next(stream)
