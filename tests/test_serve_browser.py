"""The page `omnilite serve` serves at /, in a real browser (issue 17): Debian's chromium, headless,
driven by playwright through `executable_path` (no browser download), with a fake microphone that
plays a WAV. The page must show the reply's transcript, count received reply audio and show the
turn's latencies; a screenshot is kept ($OMNILITE_TEST_ARTIFACTS, else the test's tmp dir)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from omnilite.runtime import Pipeline, PipelineConfig
from omnilite.runtime.audio import write_wav
from omnilite.runtime.serve.server import ServeConfig, ServerThread
from omnilite.runtime.session import SessionConfig

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium); "
                                             "the browser test drives it through playwright")
def test_page_talks_through_a_fake_microphone(bundle, question_16k, tmp_path):
    from playwright.sync_api import sync_playwright

    wav = tmp_path / "mic.wav"  # silence, the question, silence long enough for the endpointer
    write_wav(wav, np.concatenate([np.zeros(16000, np.float32), question_16k, np.zeros(48000, np.float32)]), 16000)
    artifacts = Path(os.environ.get("OMNILITE_TEST_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    args = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}%noloop", "--autoplay-policy=no-user-gesture-required"]
    if os.geteuid() == 0:
        args.append("--no-sandbox")  # chromium refuses to run as root with its sandbox (CI runs as root)
    config = PipelineConfig(max_new_tokens=16, ignore_eos=True, n_ctx=4096)
    with Pipeline.load(bundle, config) as pipe, \
            ServerThread([pipe], ServeConfig(port=0, session=SessionConfig(vad="silero"))) as srv, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(srv.http + "/")
            page.click("#start")
            page.wait_for_selector("#latency tbody tr", timeout=180_000)  # the turn's response.done
            page.wait_for_timeout(300)
            transcript = page.inner_text("#transcript .assistant")
            user = page.inner_text("#transcript .user")
            audio_line = page.inner_text("#audio")
            cells = page.locator("#latency tbody tr").first.locator("td").all_inner_texts()
            status, page_errors = page.inner_text("#status"), page.inner_text("#errors")
            page.screenshot(path=str(artifacts / "serve-page.png"), full_page=True)
            page.click("#stop")
            stopped = page.inner_text("#status")
        finally:
            browser.close()
    assert not errors and not page_errors, (errors, page_errors)
    assert user.startswith("you:")  # speech_started showed the user's turn
    assert len(transcript.strip()) > 0  # the reply's text streamed into the page
    received = float(audio_line.split()[1])
    assert received > 0.5, audio_line  # seconds of reply audio the page received and queued for the speaker
    turn, resp_status, ttft, ttfa, rtf, audio_s = cells
    assert turn == "1" and resp_status == "incomplete"  # 16 tokens, EOS ignored
    assert 0 < float(ttft) <= float(ttfa) and float(rtf) > 0
    assert received == pytest.approx(float(audio_s), abs=0.1)
    assert status.startswith("listening") and stopped == "stopped"
    assert (artifacts / "serve-page.png").stat().st_size > 1000
