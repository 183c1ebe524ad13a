"""A real browser (Debian's chromium, driven by Playwright) uploads, clicks and sees the result."""

import os
import re
import shutil
from pathlib import Path

import pytest

import app
from winclip.service import DetectionService, Settings
from winclip.synthetic import make_part

from chromium import CHROMIUM, launch
from conftest import TINY_CONFIG, app_py_process, serve, spy_on_encoding, spy_on_prompts, started_as_app_py

OUTPUT = Path(os.environ.get("WINCLIP_TEST_OUTPUT", Path(__file__).resolve().parent.parent / "test-output"))


pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(not shutil.which(CHROMIUM), reason=f"no chromium at {CHROMIUM} (apt-get install chromium)"),
]


@pytest.fixture(scope="module")
def url():
    service = DetectionService(Settings(model=TINY_CONFIG, pretrained=None, precision="fp32"))
    assert service.load(), service.error
    with serve(app.build_demo(service)) as address:
        yield address


def start_detect(browser, url: str, tmp_path: Path, shots: int, viewport: dict):
    """A page with a 600 x 450 query and ``shots`` references uploaded and Detect clicked."""
    from playwright.sync_api import expect

    query = tmp_path / "query.png"
    make_part(31, 480, "scratch").image.resize((600, 450)).save(query)
    refs = [tmp_path / f"good{i}.png" for i in range(shots)]
    for i, ref in enumerate(refs):
        make_part(i, 480).image.save(ref)
    page = browser.new_page(viewport=viewport)
    page.goto(url)
    expect(page.locator("#banner")).to_contain_text("RANDOM WEIGHTS", timeout=30_000)
    page.locator("#query input[type=file]").set_input_files(str(query))
    if refs:
        page.locator("#references input[type=file]").set_input_files([str(r) for r in refs])
        expect(page.locator("#references")).to_contain_text(refs[-1].stem, timeout=30_000)
    page.locator("#detect").click()
    return page


def test_upload_click_and_see_result(url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    OUTPUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = start_detect(browser, url, tmp_path, 2, {"width": 1400, "height": 1500})
            expect(page.locator("#verdict")).to_contain_text("2-shot WinCLIP+", timeout=60_000)
            expect(page.locator("#score")).to_contain_text("anomalous")
            overlay = page.locator("#overlay img")
            expect(overlay).to_be_visible(timeout=30_000)
            natural = overlay.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            assert natural == [600, 450]
            expect(page.locator("#verdict")).to_contain_text("This click took")  # what the person waited for
            page.screenshot(path=str(OUTPUT / "demo.png"), full_page=True)
            # the suggested threshold, in one click: the slider takes it and the verdict is redrawn at it
            button = page.locator("#use-suggested")
            expect(button).to_be_visible(timeout=30_000)
            suggested = re.search(r"(\d\.\d{4})", button.inner_text()).group(1)
            button.click()
            expect(page.locator("#verdict")).to_contain_text(f"vs threshold {suggested}", timeout=30_000)
            expect(page.get_by_label("number input for Threshold")).to_have_value(str(float(suggested)),
                                                                                   timeout=30_000)
            # a threshold typed in the box redraws at once (it waited for the box to lose focus), and the score
            # box's headline is the verdict at it (it headlined the longer bar: "normal" under any threshold)
            score = float(re.search(r"score \*?\*?(\d\.\d{4})", page.locator("#verdict").inner_text()).group(1))
            headline = page.locator("#score h2")
            for typed, verdict in ((score - 0.01, "ANOMALOUS"), (score + 0.01, "NORMAL")):
                page.get_by_label("number input for Threshold").fill(f"{typed:.4f}")
                expect(page.locator("#verdict")).to_contain_text(f"{verdict} — score", timeout=30_000)
                expect(page.locator("#verdict")).to_contain_text(f"vs threshold {typed:.4f}")
                expect(headline).to_have_text(verdict.lower())
        finally:
            browser.close()
    assert (OUTPUT / "demo.png").stat().st_size > 10_000


def test_a_1280_by_800_window_shows_the_inputs_and_detect_and_enter_detects(url, tmp_path, monkeypatch):
    """The Detect button sat at ~1240 px, under the settings: people uploaded a part and looked for it. Now
    the name, the words, the query, 4 references (each name whole, none scrolled out of its box) and the
    button are in the first screen (here even with the random-weights banner, which a real start lacks).
    And people type the object's name and press Enter: that detects as the button does (it did nothing),
    with the name typed; Enter in the defect words again, with the words."""
    from playwright.sync_api import expect, sync_playwright

    asked = []
    real = DetectionService.detect

    def spy(self, query, references, opts, *args, **kwargs):
        asked.append((opts.object_name, tuple(opts.defect_words), len(references)))
        return real(self, query, references, opts, *args, **kwargs)

    monkeypatch.setattr(DetectionService, "detect", spy)
    query = tmp_path / "query.png"
    make_part(33, 600, "crack").image.save(query)
    refs = [tmp_path / f"washer_good_{i}.png" for i in range(4)]
    for i, ref in enumerate(refs):
        make_part(i, 240).image.save(ref)
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = open_tab(browser, url, "Detect", 800, watch_covers=True)
            # opening the page dims nothing: the banner's status comes back without a progress cover (it had one,
            # over the banner, with nothing to wait for)
            assert page.evaluate("window.covered") == [], page.evaluate("window.covered")
            page.locator("#query input[type=file]").set_input_files(str(query))
            page.locator("#references input[type=file]").set_input_files([str(r) for r in refs])
            expect(page.locator("#references td.filename")).to_have_count(4, timeout=30_000)
            seen = page.evaluate("""() => {
                const box = e => { const r = e.getBoundingClientRect(); return [r.top, r.bottom]; };
                const list = document.querySelector('#references');
                const [top, bottom] = box(list);
                const rows = [...list.querySelectorAll('td.filename')].map(td => ({
                    name: td.innerText.replace(/\\s+/g, ''),
                    whole: [...td.querySelectorAll('span')].every(s => s.scrollWidth <= s.clientWidth + 1),
                    inside: box(td)[0] >= top && box(td)[1] <= bottom + 1}));
                return {detect: box(document.querySelector('#detect')), query: box(document.querySelector('#query')),
                        name: box(document.querySelector('#detect').closest('.column').querySelector('textarea')),
                        rows, scrolled: window.scrollY};
            }""")
            assert seen["scrolled"] == 0 and seen["detect"][1] <= 800, seen
            assert seen["name"][1] <= 800 and seen["query"][1] <= 800, seen
            assert [r["name"] for r in seen["rows"]] == [r.name for r in refs], seen
            assert all(r["whole"] and r["inside"] for r in seen["rows"]), seen
            name = page.get_by_label("Object name")
            name.fill("bottle")
            name.press("Enter")
            expect(page.locator("#verdict")).to_contain_text("4-shot WinCLIP+", timeout=60_000)
            words = page.get_by_label("Defect words (comma-separated)")
            words.fill("crack, dent")
            words.press("Enter")
            for _ in range(600):  # the second detection reaches the service
                if len(asked) >= 2:
                    break
                page.wait_for_timeout(100)
        finally:
            browser.close()
    assert asked[:2] == [("bottle", (), 4), ("bottle", ("crack", "dent"), 4)], asked


def test_a_picked_example_is_detected_from_what_the_server_prepared(monkeypatch):
    """A person's first click on a fresh page: an example, then Detect. The server prepared the examples after
    its load, so nothing is encoded at the click, and the result is the example's (2 references), in view."""
    from playwright.sync_api import expect, sync_playwright

    demo = started_as_app_py(monkeypatch)
    images, prompts = spy_on_encoding(monkeypatch), spy_on_prompts(monkeypatch)
    with serve(demo) as url, sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url)
            page.locator("#examples tr.tr-body").first.click()
            expect(page.locator("#references")).to_contain_text("washer_good_2", timeout=30_000)
            expect(page.locator("#query img")).to_be_visible(timeout=30_000)
            page.locator("#detect").click()
            expect(page.locator("#verdict")).to_contain_text("This click took", timeout=60_000)
            expect(page.locator("#verdict")).to_contain_text("2-shot WinCLIP+")
            # Detect was clicked far below the answer (the examples are at the page's foot): the page took the
            # person to the score, the verdict and the heat map
            for answer in ("#score", "#verdict", "#overlay"):
                expect(page.locator(answer)).to_be_in_viewport(timeout=5_000)
            page.get_by_text("Advanced", exact=True).click()
            expect(page.locator("#model-info")).to_contain_text("the start prompts and 3 examples prepared")
        finally:
            browser.close()
    assert images == [] and prompts == []


def test_what_a_person_typed_survives_a_reload_and_the_lists_reset_to_the_papers(url):
    """An hour of prompt editing was lost to a reload (or a closed tab, or a restarted server): the object
    name, the defect words and the three lists now come back as typed; the playground's reset puts the
    paper's lists back (and that too survives a reload) and leaves the name and words alone."""
    from playwright.sync_api import expect, sync_playwright

    from winclip.prompting import default_lists

    paper = {label: "\n".join(lines) for label, lines in zip(("Normal states", "Anomalous states (defect words "
                                                              "are added)", "Templates"), default_lists().values())}
    typed = {"Object name": "gasket", "Defect words (comma-separated)": "burr, dent",
             "Normal states": "pristine {}\nclean {}", "Templates": "a photo of the {}."}
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = open_tab(browser, url, "Detect", 800)
            for i, (label, text) in enumerate(typed.items()):
                if i == 2:  # the name and the words are on Detect, the lists on the playground
                    page.get_by_role("tab", name="Prompt playground").click()
                page.get_by_label(label).fill(text)
            page.reload()
            expect(page.locator("#banner")).to_contain_text("RANDOM WEIGHTS", timeout=30_000)
            for i, (label, text) in enumerate(typed.items()):
                if i == 2:
                    page.get_by_role("tab", name="Prompt playground").click()
                expect(page.get_by_label(label)).to_have_value(text)
            expect(page.get_by_label(next(iter(paper)))).not_to_have_value(paper["Normal states"])
            page.locator("#reset-lists").click()
            for label, text in paper.items():
                expect(page.get_by_label(label)).to_have_value(text)
            page.reload()
            expect(page.locator("#banner")).to_contain_text("RANDOM WEIGHTS", timeout=30_000)
            expect(page.get_by_label("Object name")).to_have_value("gasket")  # the reset left them as typed
            expect(page.get_by_label("Defect words (comma-separated)")).to_have_value("burr, dent")
            page.get_by_role("tab", name="Prompt playground").click()
            for label, text in paper.items():
                expect(page.get_by_label(label)).to_have_value(text)
        finally:
            browser.close()


def test_a_click_after_the_uploads_were_swept_says_upload_them_again(tmp_path):
    """A tab left open past WINCLIP_OUTPUT_HOURS: the server has deleted the uploads; the next click says
    so, naming the image, in the error toast (not "file not found", not a blank failure)."""
    from playwright.sync_api import expect, sync_playwright

    service = DetectionService(Settings(model=TINY_CONFIG, pretrained=None, precision="fp32"))
    assert service.load(), service.error
    demo = app.build_demo(service)
    with serve(demo) as address, sync_playwright() as p:
        browser = launch(p)
        try:
            page = start_detect(browser, address, tmp_path, 1, {"width": 1280, "height": 800})
            expect(page.locator("#verdict")).to_contain_text("This click took", timeout=60_000)
            for path in {Path(f) for files in demo.temp_file_sets for f in files if Path(f).name == "good0.png"}:
                path.unlink(missing_ok=True)  # as the cache sweep does
            page.locator("#detect").click()
            expect(page.locator(".toast-body")).to_contain_text(
                "reference image 1 (good0.png): the uploaded file is no longer on the server", timeout=30_000)
            expect(page.locator(".toast-body")).to_contain_text("upload it again")
            # the last result stays on screen (its verdict and maps); the score box says the click failed
            # (with the bar over every output, Gradio covered each of them with an "Error" badge)
            expect(page.locator("#score")).to_contain_text("Error")
            for shown in ("#verdict", "#overlay", "#panels"):
                expect(page.locator(shown)).not_to_contain_text("Error")
            expect(page.locator("#verdict")).to_contain_text("1-shot WinCLIP+")
            expect(page.locator("#overlay img")).to_be_visible()
            assert page.locator("#panels .thumbnail-item").count() >= 4
        finally:
            browser.close()


GALLERY = """() => { const g = document.querySelector('#panels'), w = g.querySelector('.grid-wrap');
    const box = g.getBoundingClientRect();
    const tiles = [...g.querySelectorAll('.thumbnail-item')].map(t => t.getBoundingClientRect().height);
    const caps = [...g.querySelectorAll('.caption-label')].map(c => { const r = c.getBoundingClientRect();
        return {text: c.innerText, inside: r.top >= box.top && r.bottom <= box.bottom && r.right <= box.right,
                cut: c.scrollWidth > c.clientWidth + 1}; });
    return {caps, hidden: w.scrollHeight - w.clientHeight, height: w.clientHeight, tile: Math.max(...tiles)}; }"""


@pytest.mark.parametrize("shots,width", [(2, 1280), (0, 1280), (2, 390)])
def test_detect_gallery_shows_every_map_and_caption(url, tmp_path, shots, width):
    """At 1280 x 800 the per-scale gallery shows all its rows (Gradio's 'auto' height cut the second row,
    captions included) and, zero-shot, no empty space under its one row; on a phone (390 px) two maps a row
    with their captions whole (four columns cut them to "zero-shot ...")."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = start_detect(browser, url, tmp_path, shots, {"width": width, "height": 800})
            expect(page.locator("#verdict")).to_contain_text("This click took", timeout=60_000)
            expect(page.locator("#panels .caption-label")).to_have_count(8 if shots else 4, timeout=30_000)
            page.wait_for_function("() => [...document.querySelectorAll('#panels img')].every(i => i.complete)")
            g = page.evaluate(GALLERY)
            assert g["hidden"] <= 1, g  # nothing to scroll to inside the gallery
            assert all(c["inside"] and not c["cut"] for c in g["caps"]), g["caps"]
            rows = -(-len(g["caps"]) // (4 if width >= 1280 else 2))
            assert g["height"] < (rows + 0.5) * g["tile"], g  # no empty row under the maps
            if shots and width == 1280:
                page.screenshot(path=str(OUTPUT / "demo-1280.png"), full_page=True)
            # the object name and the defect words: side by side at 1280 px, one under the other on a phone
            # (there side by side, the words' label wrapped and the two boxes sat at different heights); the page
            # may still be gliding to the answer, so both are measured in one call
            boxes = [page.get_by_label(label).element_handle()
                     for label in ("Object name", "Defect words (comma-separated)")]
            name, words = page.evaluate("boxes => boxes.map(b => b.getBoundingClientRect().toJSON())", boxes)
            assert (name["y"] == words["y"]) if width >= 1280 else (name["bottom"] < words["top"]), (name, words)
        finally:
            browser.close()


def test_offline_default_settings_explain_how_to_supply_weights(tmp_path):
    """Default model and tag with no way to download: the page says what to do; /detect says it too."""
    import time

    from gradio_client import handle_file
    from playwright.sync_api import expect, sync_playwright

    env = {k: v for k, v in os.environ.items() if not k.startswith("WINCLIP_")}
    server, url, client = app_py_process({**env, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 120
    try:
        query = tmp_path / "q.png"
        make_part(1, 200).image.save(query)
        while True:  # until the background load has failed
            with pytest.raises(Exception) as info:
                client.predict(handle_file(str(query)), [], api_name="/detect")
            if "still loading" not in str(info.value):
                break
            assert time.time() < deadline
            time.sleep(1)
        assert "WINCLIP_PRETRAINED" in str(info.value) and "hf download" in str(info.value)
        with sync_playwright() as p:
            browser = launch(p)
            try:
                page = browser.new_page()
                page.goto(url)
                expect(page.locator("#banner")).to_contain_text("could not be loaded", timeout=30_000)
                expect(page.locator("#banner")).to_contain_text("WINCLIP_PRETRAINED")
                page.screenshot(path=str(OUTPUT / "offline.png"))
            finally:
                browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_click_during_loading_waits_and_succeeds(tmp_path):
    """The first click while the model is still loading shows a wait and then the result, not an error."""
    import threading

    from playwright.sync_api import expect, sync_playwright

    release = threading.Event()

    class SlowLoad(DetectionService):
        def load(self) -> bool:
            release.wait(120)  # a first download, until the test has clicked
            return super().load()

    service = SlowLoad(Settings(model=TINY_CONFIG, pretrained=None, precision="fp32"))
    query = tmp_path / "query.png"
    make_part(12, 300, "crack").image.save(query)
    with serve(app.build_demo(service)) as address:
        service.start_loading()
        with sync_playwright() as p:
            browser = launch(p)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1200})
                page.goto(address)
                expect(page.locator("#banner")).to_contain_text("Loading", timeout=30_000)
                page.locator("#query input[type=file]").set_input_files(str(query))
                page.locator("#detect").click()
                # one bar, over the score, says what the click waits for
                expect(page.locator("#score")).to_contain_text("Waiting for the model to load", timeout=30_000)
                assert service.detector is None and service.loading  # the click really came during the load
                release.set()
                expect(page.locator("#verdict")).to_contain_text("zero-shot WinCLIP", timeout=60_000)
                expect(page.locator("#banner")).to_contain_text("RANDOM WEIGHTS", timeout=30_000)
            finally:
                release.set()
                browser.close()


def open_tab(browser, url: str, tab: str, height: int, width: int = 1280, scheme: str = "light",
             watch_covers: bool = False):
    """A page of the app (downloads accepted) on ``tab``, once the model is up; ``scheme``: the colour scheme
    the browser asks for (Gradio follows it: "dark" gives its dark theme); ``watch_covers``: record the
    progress covers shown (``window.covered``, see WATCH_COVERS)."""
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": width, "height": height}, accept_downloads=True, color_scheme=scheme)
    if watch_covers:
        page.add_init_script(WATCH_COVERS)
    page.goto(url)
    expect(page.locator("#banner")).to_contain_text("RANDOM WEIGHTS", timeout=30_000)
    # Gradio covers the whole page while it mounts the app, a moment after the banner shows: a click then lands
    # on the cover, and Playwright's retries scroll the page (0 -> 199 -> 326 px, seen under load), which a
    # person never does
    expect(page.locator(".gradio-container .main > [data-testid=status-tracker].translucent")).to_have_count(
        0, timeout=30_000)
    page.get_by_role("tab", name=tab).click()
    return page


# Every component a progress cover (Gradio's translucent status tracker) dimmed, from the page's first paint:
# ``window.covered``, the components' ids (the page's own loading cover, which has no component, left out)
WATCH_COVERS = """window.covered = [];
new MutationObserver(() => {
    for (const cover of document.querySelectorAll('[data-testid=status-tracker].translucent:not(.hide)')) {
        const host = cover.closest('[id]'), box = cover.getBoundingClientRect();
        if (box.width * box.height === 0) continue;  // not shown
        if (host && !window.covered.includes(host.id)) window.covered.push(host.id);
    }
}).observe(document, {subtree: true, childList: true, attributes: true, attributeFilter: ['class']});"""


def start_batch(browser, url: str, archive: Path, method: str | None = None, width: int = 1280,
                scheme: str = "light"):
    """A page on the Batch tab with ``archive`` uploaded and Inspect clicked (with ``method``'s title chosen,
    when given)."""
    from playwright.sync_api import expect

    page = open_tab(browser, url, "Batch", 1700 if width >= 1280 else 844, width, scheme)
    if method:
        page.get_by_label(method).check()
    page.locator("#batch-files input[type=file]").set_input_files(str(archive))
    # Gradio renders a file's name and extension in separate elements
    expect(page.locator("#batch-files")).to_contain_text(re.compile(re.escape(archive.stem) + r"\s*\.zip"),
                                                         timeout=30_000)
    page.locator("#inspect").click()
    return page


def test_empty_outputs_say_what_comes_there_before_a_run(url):
    """Before anything ran: the Batch table has its real headers (Gradio's default read "1 2 3"), no empty ROC
    box, and an empty download box is one line saying when files come, not a tall blank box."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = open_tab(browser, url, "Batch", 800)
            headers = page.locator("#batch-table th")
            expect(headers.first).to_be_visible()
            assert [t.strip() for t in headers.all_inner_texts()] == list(app.TABLE_COLUMNS)
            expect(page.locator("#batch-roc")).to_be_hidden()
            for tab, box, says in (("Batch", "#batch-downloads", "when a run ends"),
                                   ("Prompt playground", "#current-set", "after a measurement")):
                page.get_by_role("tab", name=tab).click()
                empty = page.locator(f"{box} .empty")
                expect(empty).to_be_visible()
                height = empty.bounding_box()["height"]
                text = empty.evaluate("e => getComputedStyle(e, '::after').content")
                assert height < 80 and says in text, (box, height, text)
        finally:
            browser.close()


def test_batch_tab_upload_zip_see_ranking_and_download_csv(url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from corpus import labelled_zip

    archive = labelled_zip(tmp_path / "washers.zip")
    OUTPUT.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = start_batch(browser, url, archive)
            expect(page.locator("#batch-summary")).to_contain_text("Image AUROC", timeout=120_000)
            expect(page.locator("#batch-summary")).to_contain_text("5 scored")
            expect(page.locator("#batch-gallery img")).to_have_count(5, timeout=30_000)
            captions = page.evaluate("""() => [...document.querySelectorAll('#batch-gallery .caption-label')]
                .map(c => [c.innerText, c.scrollWidth <= c.clientWidth + 1])""")
            assert len(captions) == 5 and all(whole for _, whole in captions), captions  # readable, not cut
            shown = {text.split(" · ")[-1] for text, _ in captions}  # 0.png is in good/ and crack/: which is which
            assert shown == {"good/0.png", "good/1.png", "good/2.png", "crack/0.png", "spot/1.png"}, captions
            expect(page.locator("#batch-histogram")).to_be_visible()
            expect(page.locator("#batch-histogram canvas, #batch-histogram svg").first).to_be_visible(timeout=30_000)
            expect(page.locator("#batch-histogram")).to_contain_text("threshold 0.500")  # the threshold line's label
            assert_the_histogram_reads(page)  # (light theme; the dark one: its own test)
            expect(page.locator("#batch-roc")).to_be_visible()  # a labelled set with both classes has a curve
            # the columns people came for are on screen at 1280 px, without scrolling sideways
            headers = page.locator("#batch-table th")
            texts = [t.strip() for t in headers.all_inner_texts()]
            for name in ("file", "score", "verdict", "label", "defect"):
                assert name in texts, texts
                box = headers.nth(texts.index(name)).bounding_box()
                assert box is not None and box["x"] + box["width"] <= 1280, (name, box)
            link = page.locator('#batch-downloads a[download="results.csv"]').first
            with page.expect_download(timeout=30_000) as info:
                link.click()
            saved = tmp_path / "downloaded.csv"
            info.value.save_as(saved)
            lines = saved.read_text().splitlines()
            assert lines[0].startswith("file,status,score,verdict") and len(lines) == 7
            page.screenshot(path=str(OUTPUT / "batch.png"), full_page=True)
        finally:
            browser.close()


def contrast(a: str, b: str) -> float:
    """WCAG contrast ratio of two CSS colours 'rgb(r, g, b)' (1 to 21; text needs 4.5, lines 3)."""
    def luminance(colour: str) -> float:
        channels = [int(v) / 255 for v in re.findall(r"\d+", colour)[:3]]
        r, g, b = (c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
        return 0.2126 * r + 0.7152 * g + 0.0722 * b

    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def assert_the_histogram_reads(page) -> None:
    """Every text and axis line of the Batch histogram against the colour behind it, and each threshold label
    against its outline (text 4.5:1, lines 3:1)."""
    from playwright.sync_api import expect

    expect(page.locator("#batch-histogram svg")).to_be_visible(timeout=120_000)
    seen = page.evaluate("""() => {
        const plot = document.querySelector('#batch-histogram svg');
        let n = plot, behind = 'rgba(0, 0, 0, 0)';
        while (n && behind === 'rgba(0, 0, 0, 0)') {
            behind = getComputedStyle(n).backgroundColor;
            n = n.parentElement;
        }
        const texts = [...plot.querySelectorAll('text')].map(t => [t.textContent, getComputedStyle(t).fill,
                                                                 getComputedStyle(t).stroke]);
        const axes = [...plot.querySelectorAll('line')].map(l => getComputedStyle(l).stroke);
        return {behind, texts, axes};
    }""")
    assert len(seen["texts"]) >= 10 and seen["axes"], seen  # title, ticks, axis labels, legend, lines
    for text, fill, outline in seen["texts"]:
        assert contrast(fill, seen["behind"]) >= 4.5, (text, fill, seen["behind"])
        if text.startswith(("threshold", "F1-optimal")):  # drawn over bars: outlined in the page's colour
            assert contrast(fill, outline) >= 4.5, (text, fill, outline)
    assert all(contrast(stroke, seen["behind"]) >= 3 for stroke in seen["axes"]), seen


def test_batch_histogram_reads_in_the_dark_theme(url, tmp_path):
    """Gradio follows the viewer's dark-mode setting; the histogram's title, axes, ticks, legend and threshold
    labels were drawn black on its near-black page (contrast 1.1:1). The light theme: the batch test above."""
    from playwright.sync_api import sync_playwright

    from corpus import labelled_zip

    archive = labelled_zip(tmp_path / "washers.zip")
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = start_batch(browser, url, archive, scheme="dark")
            assert page.evaluate("() => document.body.classList.contains('dark')")  # Gradio's dark theme is on
            assert_the_histogram_reads(page)
        finally:
            browser.close()


def test_batch_stop_keeps_the_rows_so_far_and_says_so(url, tmp_path):
    """While a batch runs, the one progress bar names the stage; Stop ends it with 'Stopped after n of N',
    the rows so far in the table and in the downloadable results.csv."""
    import zipfile

    from playwright.sync_api import expect, sync_playwright

    part = tmp_path / "part.jpg"
    make_part(5, 3000).image.save(part, quality=40)  # 9 MP each: decoding keeps the run going for seconds
    archive = tmp_path / "many.zip"  # under the app's 20 MB per upload
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(75):
            zf.write(part, f"many/{i:03d}.jpg")
    assert archive.stat().st_size < 16e6
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = start_batch(browser, url, archive)
            expect(page.locator("#batch-summary")).to_contain_text(re.compile(r"Scored many\.zip/many/\d+\.jpg"),
                                                                   timeout=60_000)  # the bar's stage text
            expect(page.locator("#batch-summary")).to_contain_text(re.compile(r"Inspecting… \d+/75"),
                                                                   timeout=60_000)  # partial rows arrived
            page.get_by_role("button", name="Stop").click()
            summary = page.locator("#batch-summary")
            expect(summary).to_contain_text(re.compile(r"Stopped after \d+ of 75 files"), timeout=60_000)
            done = int(re.search(r"Stopped after (\d+) of 75", summary.inner_text()).group(1))
            assert 0 < done < 75
            link = page.locator('#batch-downloads a[download="results.csv"]').first
            with page.expect_download(timeout=30_000) as info:
                link.click()
            saved = tmp_path / "stopped.csv"
            info.value.save_as(saved)
            assert len(saved.read_text().splitlines()) == done + 1  # header + the rows scored before Stop
            page.screenshot(path=str(OUTPUT / "batch-stopped.png"), full_page=True)
        finally:
            browser.close()


def test_musc_bar_names_its_step_while_the_set_is_encoded(url, tmp_path):
    """MuSc gives no row until the whole set is scored: the bar says how far the encoding has got (k of N)
    instead of sitting at 0, then the results arrive."""
    import zipfile

    from playwright.sync_api import expect, sync_playwright

    part = tmp_path / "part.jpg"
    make_part(6, 2400).image.save(part, quality=40)  # 5.8 MP each: decoding keeps the encoding going for seconds
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(24):  # long names, as cameras write them: the gallery's captions must stay readable
            zf.write(part, f"set/station3_camera2_part_{i:04d}_2026-11-30.jpg")
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = start_batch(browser, url, archive, method="MuSc")
            summary = page.locator("#batch-summary")
            expect(summary).to_contain_text(re.compile(r"MuSc: encoded \d+ of 24 images"), timeout=60_000)
            expect(summary).to_contain_text("24 scored", timeout=120_000)
            expect(page.locator("#batch-gallery .caption-label")).to_have_count(24, timeout=30_000)
            captions = page.evaluate("""() => [...document.querySelectorAll('#batch-gallery .caption-label')]
                .map(c => [c.innerText, c.scrollWidth <= c.clientWidth + 1])""")
            assert all(whole for _, whole in captions), captions  # whole, not cut off by the tile
            assert all(re.search(r"station3_c…11-30\.jpg$", text) for text, _ in captions), captions
        finally:
            browser.close()


def test_batch_results_on_a_phone_fit_its_width(url, tmp_path):
    """At 390 px (a stakeholder opening the Space's link on a phone) the ranked gallery's tiles fit the width
    (5 columns overflowed: 3 of 100 px shown), under its two-line label, with whole captions, and the histogram
    gets the width instead of 142 px beside the ROC."""
    from playwright.sync_api import expect, sync_playwright

    from corpus import labelled_zip

    archive = labelled_zip(tmp_path / "washers.zip")
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = start_batch(browser, url, archive, width=390)
            expect(page.locator("#batch-summary")).to_contain_text("Image AUROC", timeout=120_000)
            expect(page.locator("#batch-gallery .gallery-item")).to_have_count(5, timeout=30_000)
            page.locator("#batch-gallery").scroll_into_view_if_needed()
            seen = page.evaluate("""() => {
                const g = document.querySelector('#batch-gallery'), box = g.getBoundingClientRect();
                const label = g.querySelector('[data-testid=block-label]').getBoundingClientRect();
                const tiles = [...g.querySelectorAll('.gallery-item')].map(t => t.getBoundingClientRect());
                return {right: box.right, left: box.left, label: label.bottom, tiles: tiles.map(t => [t.left, t.right]),
                        top: Math.min(...tiles.map(t => t.top)),
                        captions: [...g.querySelectorAll('.caption-label')].map(c =>
                            [c.innerText, c.scrollWidth <= c.clientWidth + 1, c.scrollHeight <= c.clientHeight + 1]),
                        histogram: document.querySelector('#batch-histogram').getBoundingClientRect().width}; }""")
            assert all(seen["left"] <= left and right <= seen["right"] + 1 for left, right in seen["tiles"]), seen
            assert seen["top"] >= seen["label"], seen  # the first row is not under the label
            assert all(wide and tall and "…" not in text for text, wide, tall in seen["captions"]), seen["captions"]
            assert seen["histogram"] >= 300, seen
        finally:
            browser.close()


def shown_rows(page, table: str) -> list[list[str]]:
    """The text of the rows a gr.Dataframe (``table``: its elem_id selector) shows, as a person reads them."""
    return page.locator(table).evaluate("""t => [...t.querySelectorAll('.virtual-row')]
        .map(r => [...r.querySelectorAll('[role=gridcell]')].map(c => c.innerText.trim()))""")


def test_playground_measures_a_labelled_zip_and_an_edit_changes_the_auroc_row(url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from corpus import labelled_zip

    archive = labelled_zip(tmp_path / "washers.zip")
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = open_tab(browser, url, "Prompt playground", 2200)
            page.locator("#labelled input[type=file]").set_input_files(str(archive))
            expect(page.locator("#labelled")).to_contain_text(re.compile(r"washers\s*\.zip"), timeout=30_000)
            page.locator("#measure").click()
            summary = page.locator("#measure-summary")
            expect(summary).to_contain_text("5 images", timeout=120_000)
            table = page.locator("#sets-table")
            expect(table).to_contain_text("current edit")

            def current_row() -> str:
                return table.locator("tr", has_text="current edit").first.inner_text()

            before = current_row()
            normal = page.get_by_label("Normal states")
            normal.fill("scratched {}\nflawless {}")  # an edit that changes the normal prototype
            page.locator("#measure").click()
            expect(summary).to_contain_text("from the cache", timeout=120_000)
            expect(table.locator("tr", has_text="current edit").first).not_to_have_text(before, timeout=30_000)
            for table_id, name in (("#per-prompt", "AUROC alone"), ("#word-auroc", "contribution")):
                headers = page.locator(f"{table_id} th")
                texts = [t.strip() for t in headers.all_inner_texts()]
                assert name in texts, texts
                box = headers.nth(texts.index(name)).bounding_box()  # the number people came for, on screen
                assert box is not None and box["x"] + box["width"] <= 1280, (name, box)
            panel = page.locator("#word-auroc").bounding_box()  # all four columns, with no words typed too
            rights = [b["x"] + b["width"] for b in (h.bounding_box() for h in page.locator("#word-auroc th").all())]
            assert len(rights) == 4 and max(rights) <= panel["x"] + panel["width"] + 1, (rights, panel)
            # every number with 4 decimals ("0.5000" beside "0.4167", not "0.5"), "–" where one does not apply,
            # and a header's sort orders the numbers with what is shown following them
            sets = shown_rows(page, "#sets-table")
            numbers = [cell for row in sets for cell in row[1:]]
            assert len(sets) == 2 and all(re.fullmatch(r"-?\d\.\d{4}|–", cell) for cell in numbers), sets
            header = page.locator("#per-prompt th", has_text="AUROC alone")
            header.hover()
            header.locator("button[aria-label='Open cell menu']").click()
            page.get_by_role("menuitem", name="Sort ascending").click()
            aurocs = [row[0] for row in shown_rows(page, "#per-prompt")]
            assert len(aurocs) >= 8 and all(re.fullmatch(r"\d\.\d{4}", a) for a in aurocs), aurocs
            assert aurocs == sorted(aurocs, key=float), aurocs
            page.mouse.move(0, 0)  # no header's menu button in the picture
            page.screenshot(path=str(OUTPUT / "playground.png"), full_page=True)
        finally:
            browser.close()
