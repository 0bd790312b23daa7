"""docs/studio.png: pagkit studio's Compare tab after one Generate at the page's defaults, in headless Chromium.

    PYTHONPATH=src python docs/make_studio_screenshot.py [--out docs/studio.png] [--tabs DIR]

Needs ``pip install 'pagkit[studio]' playwright`` and Debian's ``chromium`` (no ``playwright install``). Prints
how long the default grid (fmnist, DDIM-20, 8 seeds, 4 configurations) took; ``--tabs DIR`` also writes a
screenshot of each other tab there (the strip and sites drawn at few steps).
"""
from __future__ import annotations

import argparse
import shutil
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))

from pagkit.studio import command  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).parent / "studio.png"))
    parser.add_argument("--tabs", default=None, help="also screenshot the other tabs into this folder")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    opts = parser.parse_args()
    from playwright.sync_api import sync_playwright
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = argparse.Namespace(model="fmnist", models_root=None, files_root=str(Path(__file__).parents[1]),
                              host="127.0.0.1", port=port, auth=None, threads=None)
    app, url = command.launch(args, block=False)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=opts.chromium, headless=True,
                                        args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            page = browser.new_page(viewport={"width": 1280, "height": 1300})
            page.set_default_timeout(300_000)
            page.goto(url)
            page.wait_for_selector("#config-0 textarea")
            start = time.perf_counter()
            page.click("#generate")
            page.wait_for_selector("#compare-grid img")
            print(f"default grid (4 configurations x 8 seeds, 20 steps): {time.perf_counter() - start:.1f} s")
            time.sleep(1)
            page.screenshot(path=opts.out, full_page=True)
            print(f"wrote {opts.out}")
            if opts.tabs:
                out = Path(opts.tabs)
                out.mkdir(parents=True, exist_ok=True)
                page.fill("#steps input", "4")
                page.locator("#steps input").dispatch_event("blur")
                for tab, button, wait in (("Scale strip", "#strip-generate", "#strip-grid img"),
                                          ("Sites", "#sites-generate", "#sites-grid img")):
                    page.get_by_role("tab", name=tab).click()
                    page.click(button)
                    page.wait_for_selector(wait)
                    time.sleep(1)
                    page.screenshot(path=str(out / f"{tab.split()[0].lower()}.png"), full_page=True)
                page.get_by_role("tab", name="Results").click()
                page.screenshot(path=str(out / "results.png"), full_page=True)
                print(f"wrote the other tabs into {out}")
            browser.close()
    finally:
        app.close()


if __name__ == "__main__":
    main()
