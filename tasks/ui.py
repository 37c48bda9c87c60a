"""The VM server's UI as a person sees it: headless Chromium logs in and takes screenshots.

Uses Debian's ``chromium`` (``sails-sandbox install`` installs it on a sandbox machine) driven by
playwright (the ``ui`` extra). The auth string is typed into the login page and never leaves
this process; what each page shows is returned as text so callers can check it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import BaseModel, Field

from core.errors import BootstrapError
from core.log import logger

ATTEMPTS = 2  # loads of a page before it counts as failed
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


class UIPage(BaseModel):
    name: str
    url: str
    screenshot: str
    text: str = ""


class UIRecord(BaseModel):
    ui_url: str
    pages: list[UIPage] = Field(default_factory=list)

    def page(self, name: str) -> UIPage:
        return next(p for p in self.pages if p.name == name)


def chromium_path() -> str:
    for candidate in (shutil.which("chromium"), *CHROMIUM_CANDIDATES):
        if candidate and Path(candidate).exists():
            return candidate
    raise BootstrapError(
        "no Chromium found: install Debian's package (apt-get install chromium) "
        "or, on a sandbox machine, run `sails-sandbox install`"
    )


def capture_ui(
    ui_url: str,
    auth_string: str | None,
    pages: dict[str, tuple[str, str]],
    out_dir: Path,
    timeout: float = 60,
) -> UIRecord:
    """Log in (when the server asks for it) and screenshot each page.

    ``pages`` maps a name to (path under the UI, text the page must show before the
    screenshot is taken); the screenshots are written to ``out_dir/<name>.png``.
    """
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError as exc:  # the `ui` extra
        raise BootstrapError(
            "the UI check needs playwright: pip install 'alma-sails-bootstrap[ui]'"
        ) from exc
    log = logger()
    out_dir.mkdir(parents=True, exist_ok=True)
    record = UIRecord(ui_url=ui_url)
    ms = int(timeout * 1000)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium_path(), args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.set_default_timeout(ms)

            def log_in_if_asked(url: str) -> None:
                # The UI checks the stored auth string on every load and, when that check's
                # API call fails (a busy server), forgets it and shows the login page again:
                # log in again, as a person would.
                if "/login" not in page.url:
                    return
                if not auth_string:
                    raise BootstrapError(f"{ui_url} asks for a login but no auth string is set")
                field = page.locator("input").first
                field.fill(auth_string)
                field.press("Enter")
                page.wait_for_url(lambda u: "/login" not in u, timeout=ms)
                log.info("logged in to %s", ui_url)
                if page.url.split("?")[0] != url:
                    page.goto(url, wait_until="networkidle")

            page.goto(f"{ui_url}/dashboard", wait_until="networkidle")
            log_in_if_asked(f"{ui_url}/dashboard")
            for name, (path, expect) in pages.items():
                url = f"{ui_url}{path}"
                # A page whose API calls failed (a busy server) stays empty until reloaded, as a
                # person would: one reload before the page counts as failed.
                for attempt in range(1, ATTEMPTS + 1):
                    page.goto(url, wait_until="networkidle")
                    try:
                        log_in_if_asked(url)
                        page.get_by_text(expect).first.wait_for(timeout=ms)
                        break
                    except PlaywrightError as exc:
                        failed = out_dir / f"{name}-failed.png"
                        page.screenshot(path=str(failed), full_page=True)
                        if attempt == ATTEMPTS:
                            raise BootstrapError(
                                f"the UI page {url} does not show {expect!r} within "
                                f"{timeout:.0f} s, {ATTEMPTS} loads (screenshot: {failed})"
                            ) from exc
                        log.warning("UI page %s: no %r yet; loading it again", name, expect)
                shot = out_dir / f"{name}.png"
                page.screenshot(path=str(shot), full_page=True)
                text = page.locator("body").inner_text()
                record.pages.append(UIPage(name=name, url=url, screenshot=str(shot), text=text))
                log.info("UI page %s: %s", name, shot)
        finally:
            browser.close()
    return record
