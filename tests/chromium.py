"""Debian's chromium for Playwright (it cannot download a browser here): the browser tests and
benchmarks/click_latency.py launch it the same way."""

import os

CHROMIUM = os.environ.get("WINCLIP_CHROMIUM", "/usr/bin/chromium")

# offline and quiet: no sandbox in containers, no GPU, no background traffic to Google's services
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def launch(playwright):
    """A headless chromium from ``sync_playwright()``."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
